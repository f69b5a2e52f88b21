//! Stop strings, matched on decoded text across token boundaries. Text that
//! could still become a stop string is held back until it is known not to.

pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds newly decoded text. Returns the text now safe to emit, and
    /// whether a stop string was hit (the text then ends right before it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.text.push_str(delta);
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(at) = hit {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        let safe = self.text.len() - self.held_back();
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Bytes at the end of the text that are a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > best && self.text.ends_with(&stop[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    /// Releases whatever was held back (generation ended without a stop).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text emitted or pending, stop string excluded.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, hit) = m.push(p);
            out += &text;
            if hit {
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn cuts_exactly_before_the_stop_string() {
        assert_eq!(
            run(&["\n\n"], &["Hello", " world", "\n", "\nmore"]),
            ("Hello world".into(), true)
        );
        assert_eq!(run(&["END"], &["abcE", "N", "Dxyz"]), ("abc".into(), true));
        assert_eq!(run(&["stop"], &["no stop", "here"]), ("no ".into(), true));
    }

    #[test]
    fn releases_partial_matches_that_do_not_complete() {
        assert_eq!(run(&["END"], &["abcE", "N", "x"]), ("abcENx".into(), false));
        assert_eq!(run(&["END"], &["abcEN"]), ("abcEN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abcE"), ("abc".into(), false));
        assert_eq!(m.push("Z"), ("EZ".into(), false));
    }
}
