//! Taking out of an output what differs between any two runs, of etcd itself as much as of
//! raftkv, so that what is left can be compared exactly: log lines and their timestamps,
//! timings, cluster and member ids, raft terms, random ids named by order, the padding and
//! rule widths that follow from an id's digits, lists whose order the server does not fix.
//! Each differential test composes its own normalization from these pieces; a piece never
//! takes out more than its doc says, so a difference that matters still shows.

/// etcdctl's stderr without log lines (its client library's, JSON, and its own, each with
/// a timestamp): what it says to its user.
pub fn messages(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with('{') && !l.contains(" W | ") && !l.contains(" I | "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// etcdctl's `Error:` lines only, each ending in a newline (what it says when a command
/// fails; its retry warnings, with timestamps, left out).
pub fn error_lines(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The number (perhaps negative) after the first `label` in `text`, spaces between them
/// allowed.
pub fn number_after(text: &str, label: &str) -> Option<i64> {
    let at = text.find(label)? + label.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit() && c != '-')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Every number after one of `labels` (spaces between them kept; a leading minus sign
/// belongs to the number) replaced by `map` of it.
pub fn replace_after(text: &str, labels: &[&str], map: &mut dyn FnMut(&str) -> String) -> String {
    let mut out = text.to_string();
    for label in labels {
        let mut result = String::new();
        let mut rest = out.as_str();
        while let Some(at) = rest.find(label) {
            let after = at + label.len();
            result.push_str(&rest[..after]);
            rest = &rest[after..];
            let spaces = rest.len() - rest.trim_start_matches(' ').len();
            result.push_str(&rest[..spaces]);
            rest = &rest[spaces..];
            let end = rest
                .char_indices()
                .find(|&(i, c)| !(c.is_ascii_digit() || c == '-' && i == 0))
                .map_or(rest.len(), |(i, _)| i);
            if end > 0 {
                result.push_str(&map(&rest[..end]));
                rest = &rest[end..];
            }
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// The cluster id, member id and raft term of every response header etcdctl prints (json
/// and fields formats) replaced by `<id>`: random, or counting elections. With `keep_zero`,
/// a 0 stays (an empty header shows).
pub fn hide_header_ids(text: &str, keep_zero: bool) -> String {
    replace_after(
        text,
        &[
            "\"cluster_id\":",
            "\"member_id\":",
            "\"raft_term\":",
            "\"ClusterID\" :",
            "\"MemberID\" :",
            "\"RaftTerm\" :",
        ],
        &mut |n| {
            if keep_zero && n == "0" {
                n.into()
            } else {
                "<id>".into()
            }
        },
    )
}

/// Runs of whitespace made one space, ends trimmed: etcdctl pads ids to 16 hex digits with
/// spaces, so an id with a leading zero digit comes after one space more.
pub fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A table's rule (`+----+---+`) with one dash per column: a rule is as wide as its
/// column's widest cell, which for an id column depends on the ids' digits. Other lines
/// are left as they are.
pub fn one_dash_per_column(line: &str) -> String {
    let mut l = line.to_string();
    if !l.is_empty() && l.chars().all(|c| c == '+' || c == '-') {
        while l.contains("--") {
            l = l.replace("--", "-");
        }
    }
    l
}

/// What follows `took = ` on a line (how long a command took) replaced by `<t>`.
pub fn hide_took(s: &str) -> String {
    s.lines()
        .map(|l| match l.find("took = ") {
            Some(i) => format!("{}took = <t>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The list after each `label`, up to `close`: its items (split by `sep`) sorted.
pub fn sort_lists(text: &str, label: &str, sep: &str, close: char) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(label) {
        let after = at + label.len();
        out.push_str(&rest[..after]);
        rest = &rest[after..];
        let end = rest.find(close).unwrap_or(rest.len());
        let mut items: Vec<&str> = rest[..end].split(sep).collect();
        items.sort_unstable();
        out.push_str(&items.join(sep));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Runs of lines each starting with `prefix`, sorted.
pub fn sort_line_runs(text: &str, prefix: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for l in text.split_inclusive('\n') {
        if l.starts_with(prefix) {
            run.push(l);
            continue;
        }
        run.sort_unstable();
        out.append(&mut run);
        out.push(l);
    }
    run.sort_unstable();
    out.append(&mut run);
    out.concat()
}

/// Every maximal run of ASCII letters and digits that `name` knows replaced by its name.
pub fn rename_words(text: &str, name: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match name(word) {
            Some(n) => out.push_str(&n),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Names for random values (lease ids, revisions), `<prefix>1`, `<prefix>2`, … in the order
/// they are first named, so that two runs that did the same things name them alike.
pub struct Names {
    prefix: String,
    seen: Vec<String>,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
            seen: Vec::new(),
        }
    }

    /// `raw`'s name, a new one if it has none yet.
    pub fn name(&mut self, raw: &str) -> String {
        let i = self.seen.iter().position(|n| n == raw).unwrap_or_else(|| {
            self.seen.push(raw.to_string());
            self.seen.len() - 1
        });
        format!("{}{}", self.prefix, i + 1)
    }

    /// `raw`'s name, if it has one.
    pub fn get(&self, raw: &str) -> Option<String> {
        let i = self.seen.iter().position(|n| n == raw)?;
        Some(format!("{}{}", self.prefix, i + 1))
    }
}
