//! The data plane (`marketgate proxy`): enforces purchases on buyers' calls and forwards them.
