//! The `marketgate` command: parses the command line, loads the configuration and hands over
//! to the library. Nothing here decides anything a test would want to check.

fn main() {
    eprintln!("marketgate: under construction");
}
