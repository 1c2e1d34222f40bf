//! Routing: a group's published APIs compiled into an ordered list, most specific first.
//!
//! Owns the match of a request's method and path to an API and the capture of `{name}` /
//! `{name+}` parameters. Specificity is a property of the route alone, so routes are sorted
//! once at compile time and the first match wins: at the first position where two routes
//! differ, a literal beats a parameter, a parameter beats `{name+}`, which beats an SWA
//! prefix; the exact end of a NORMAL route beats everything at that position; a longer
//! route beats a shorter one; a named method beats `ANY`. It does not authenticate or decide
//! whether an API is sellable.

use crate::template::Segment;

const RANK_PREFIX: u8 = 0;
const RANK_GREEDY: u8 = 1;
const RANK_PARAM: u8 = 2;
const RANK_LITERAL: u8 = 3;
const RANK_END: u8 = 4;

#[derive(Debug, Clone)]
enum Piece {
    Literal(Box<str>),
    Param,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// NORMAL: the path ends here.
    End,
    /// `{name+}`: one or more segments remain.
    Greedy,
    /// SWA: zero or more segments remain.
    Prefix,
}

#[derive(Debug, Clone)]
struct Route {
    pieces: Vec<Piece>,
    tail: Tail,
    /// `None` is `ANY`.
    method: Option<http::Method>,
    ranks: Vec<u8>,
    target: usize,
}

/// The routes of one group.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

/// A match: the API index given at [`Router::insert`] and the parameter values, in the order
/// they appear in the template (raw, still percent-encoded).
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'p> {
    pub target: usize,
    pub params: Vec<&'p str>,
}

impl Router {
    /// Adds a route; `method` `None` is `ANY`.
    pub fn insert(
        &mut self,
        method: Option<http::Method>,
        template: &[Segment],
        prefix_match: bool,
        target: usize,
    ) {
        let mut pieces = Vec::new();
        let mut ranks = Vec::new();
        let mut tail = if prefix_match {
            Tail::Prefix
        } else {
            Tail::End
        };
        for segment in template {
            match segment {
                Segment::Literal(l) => {
                    pieces.push(Piece::Literal(l.as_str().into()));
                    ranks.push(RANK_LITERAL);
                }
                Segment::Param(_) => {
                    pieces.push(Piece::Param);
                    ranks.push(RANK_PARAM);
                }
                Segment::Greedy(_) => tail = Tail::Greedy,
            }
        }
        ranks.push(match tail {
            Tail::End => RANK_END,
            Tail::Greedy => RANK_GREEDY,
            Tail::Prefix => RANK_PREFIX,
        });
        self.routes.push(Route {
            pieces,
            tail,
            method,
            ranks,
            target,
        });
        self.routes.sort_by(|a, b| {
            b.ranks
                .cmp(&a.ranks)
                .then(b.method.is_some().cmp(&a.method.is_some()))
        });
    }

    /// Hot path: the most specific route matching `method` and `path`.
    pub fn find<'p>(&self, method: &http::Method, path: &'p str) -> Option<Matched<'p>> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        'routes: for route in &self.routes {
            if route.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            let mut params = Vec::new();
            let mut rest = trimmed;
            for piece in &route.pieces {
                if rest.is_empty() {
                    continue 'routes;
                }
                let (segment, after) = rest.split_once('/').unwrap_or((rest, ""));
                match piece {
                    Piece::Literal(l) if **l == *segment => {}
                    Piece::Literal(_) => continue 'routes,
                    Piece::Param => params.push(segment),
                }
                rest = after;
            }
            match route.tail {
                Tail::End if !rest.is_empty() => continue,
                Tail::Greedy if rest.is_empty() => continue,
                Tail::Greedy => params.push(rest),
                Tail::End | Tail::Prefix => {}
            }
            return Some(Matched {
                target: route.target,
                params,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::parse_template;

    fn router(routes: &[(&str, &str, bool)]) -> Router {
        let mut r = Router::default();
        for (i, (method, uri, swa)) in routes.iter().enumerate() {
            let method = (*method != "ANY").then(|| method.parse().unwrap());
            r.insert(method, &parse_template(uri).unwrap(), *swa, i);
        }
        r
    }

    /// The most specific route wins; the table pins the order.
    #[test]
    fn most_specific_route_wins() {
        let r = router(&[
            ("GET", "/a/b/c", false),     // 0
            ("GET", "/a/{x}/c", false),   // 1
            ("GET", "/a/b", true),        // 2 SWA
            ("GET", "/a/{rest+}", false), // 3
            ("ANY", "/a/b/c", false),     // 4
            ("GET", "/a", true),          // 5 SWA
            ("POST", "/a/{x}", false),    // 6
            ("GET", "/", true),           // 7 SWA root
            ("GET", "/a/b", false),       // 8
        ]);
        let get = http::Method::GET;
        let post = http::Method::POST;
        let put = http::Method::PUT;
        type Row<'a> = (&'a http::Method, &'a str, Option<(usize, &'a [&'a str])>);
        let table: &[Row<'_>] = &[
            (&get, "/a/b/c", Some((0, &[]))),
            (&put, "/a/b/c", Some((4, &[]))),
            (&get, "/a/z/c", Some((1, &["z"]))),
            (&get, "/a/b/d", Some((2, &[]))),
            (&get, "/a/b", Some((8, &[]))),
            (&get, "/a/b/", Some((8, &[]))),
            (&get, "/a/z/d/e", Some((3, &["z/d/e"]))),
            (&get, "/a", Some((5, &[]))),
            (&post, "/a/q", Some((6, &["q"]))),
            (&post, "/a/q/r", None),
            (&get, "/zzz", Some((7, &[]))),
            (&get, "/ab", Some((7, &[]))),
        ];
        for (method, path, want) in table {
            let got = r.find(method, path).map(|m| (m.target, m.params));
            let want = want.map(|(t, p)| (t, p.to_vec()));
            assert_eq!(got, want, "{method} {path}");
        }
    }

    #[test]
    fn normal_is_exact_and_swa_is_segment_prefix() {
        let r = router(&[("GET", "/v1/items", false), ("GET", "/v2/items", true)]);
        assert!(r.find(&http::Method::GET, "/v1/items/1").is_none());
        assert!(r.find(&http::Method::GET, "/v2/items/1").is_some());
        assert!(r.find(&http::Method::GET, "/v2/itemsx").is_none());
        assert!(r.find(&http::Method::POST, "/v1/items").is_none());
    }
}
