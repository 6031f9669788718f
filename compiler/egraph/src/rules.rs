//! Rules as data. A rules file holds one rewrite per line, in egg's pattern syntax:
//!
//! ```text
//! # comment
//! NAME: LHS => RHS [if COND, COND...]
//! ```
//!
//! Conditions: `const(?a)` (computable at compile time), `nonconst(?a)`, `scalar(?a)` (a constant
//! with one element), `rank(?a)=N`, `rank(?a)>=N`, `same-shape(?a,?b)` (statically equal shapes),
//! `lastdim(?c,?w)` (a constant that varies only along its last axis, as long as ?w's last axis),
//! `flattened-matmul(?x,?w)` (?x's last dim is ?w's first and the matched value has ?x's leading
//! dims: a Reshape → MatMul → Reshape that only flattens the leading dims).
//! Errors name the file and line. The built-in rules (`rules/lossless.rules`) are loaded the same way.

use std::path::Path;

use egg::{Applier, Condition, ConditionalApplier, EGraph, Id, Pattern, Rewrite, Subst, Var};
use wcc_ir::Dim;

use crate::analysis::Facts;
use crate::lang::Op;

/// The rules shipped with wcc.
pub const BUILTIN: &str = include_str!("../rules/lossless.rules");
/// Opt-in rules that move the attention scale into the query projection.
pub const ATTENTION_SCALE: &str = include_str!("../rules/attention-scale.rules");

pub type Rule = Rewrite<Op, Facts>;

#[derive(Debug, Clone)]
enum Pred {
    Const(Var),
    NonConst(Var),
    Scalar(Var),
    Rank(Var, usize, bool),
    SameShape(Var, Var),
    LastDim(Var, Var),
    /// ?x's last dim equals ?w's first, and the matched value keeps ?x's leading dims.
    FlattenedMatMul(Var, Var),
}

#[derive(Debug, Clone)]
struct Check(Vec<Pred>);

impl Condition<Op, Facts> for Check {
    fn check(&self, egraph: &mut EGraph<Op, Facts>, eclass: Id, subst: &Subst) -> bool {
        let info = |v: &Var| &egraph[subst[*v]].data;
        self.0.iter().all(|p| match p {
            Pred::Const(v) => info(v).constant && !info(v).attr,
            Pred::NonConst(v) => !info(v).constant,
            Pred::Scalar(v) => {
                let i = info(v);
                i.constant && i.ty.shape.as_ref().is_some_and(|s| s.iter().all(|d| *d == Dim::Known(1)))
            }
            Pred::Rank(v, n, at_least) => info(v).ty.shape.as_ref().is_some_and(|s| if *at_least { s.len() >= *n } else { s.len() == *n }),
            Pred::SameShape(a, b) => {
                let (x, y) = (info(a).ty.shape.clone(), info(b).ty.shape.clone());
                matches!((x, y), (Some(x), Some(y)) if x == y && x.iter().all(|d| !matches!(d, Dim::Unknown)))
            }
            Pred::FlattenedMatMul(x, w) => {
                let (xs, ws, rs) = (info(x).ty.shape.clone(), info(w).ty.shape.clone(), egraph[eclass].data.ty.shape.clone());
                match (xs, ws, rs) {
                    (Some(xs), Some(ws), Some(rs)) if xs.len() >= 2 && ws.len() == 2 && rs.len() == xs.len() => {
                        let known = |d: &Dim| !matches!(d, Dim::Unknown);
                        matches!((xs.last(), ws.first()), (Some(Dim::Known(a)), Some(Dim::Known(b))) if a == b)
                            && rs[..rs.len() - 1] == xs[..xs.len() - 1]
                            && rs.iter().all(known)
                            && rs.last() == ws.last()
                    }
                    _ => false,
                }
            }
            Pred::LastDim(c, w) => {
                // A constant that only varies along the last axis, as long as ?w's last axis.
                let (ci, wi) = (info(c), info(w));
                match (&ci.ty.shape, &wi.ty.shape) {
                    (Some(cs), Some(ws)) if ci.constant && !cs.is_empty() && cs.len() <= 2 => {
                        cs[..cs.len() - 1].iter().all(|d| *d == Dim::Known(1)) && matches!((cs.last(), ws.last()), (Some(Dim::Known(a)), Some(Dim::Known(b))) if a == b)
                    }
                    _ => false,
                }
            }
        })
    }

    fn vars(&self) -> Vec<Var> {
        self.0
            .iter()
            .flat_map(|p| match p {
                Pred::Const(v) | Pred::NonConst(v) | Pred::Scalar(v) | Pred::Rank(v, _, _) => {
                    vec![*v]
                }
                Pred::SameShape(a, b) | Pred::LastDim(a, b) | Pred::FlattenedMatMul(a, b) => {
                    vec![*a, *b]
                }
            })
            .collect()
    }
}

fn parse_var(s: &str) -> Result<Var, String> {
    s.trim()
        .parse::<Var>()
        .map_err(|_| format!("'{}' is not a pattern variable (write ?name)", s.trim()))
}

fn parse_pred(c: &str) -> Result<Pred, String> {
    let c = c.trim();
    let open = c
        .find('(')
        .ok_or_else(|| format!("condition '{c}': expected NAME(?var)"))?;
    let close = c
        .rfind(')')
        .filter(|close| *close > open)
        .ok_or_else(|| format!("condition '{c}': missing ')' after '('"))?;
    let name = &c[..open];
    let args: Vec<&str> = c[open + 1..close].split(',').collect();
    let rest = c[close + 1..].trim();
    let one = || -> Result<Var, String> {
        if args.len() != 1 {
            return Err(format!("condition '{c}' takes one variable"));
        }
        parse_var(args[0])
    };
    Ok(match name {
        "const" => Pred::Const(one()?),
        "nonconst" => Pred::NonConst(one()?),
        "scalar" => Pred::Scalar(one()?),
        "rank" => {
            let (at_least, n) = if let Some(n) = rest.strip_prefix(">=") {
                (true, n)
            } else if let Some(n) = rest.strip_prefix('=') {
                (false, n)
            } else {
                return Err(format!("condition '{c}': write rank(?a)=N or rank(?a)>=N"));
            };
            let n = n
                .trim()
                .parse()
                .map_err(|_| format!("condition '{c}': '{n}' is not a number"))?;
            Pred::Rank(one()?, n, at_least)
        }
        "same-shape" | "lastdim" | "flattened-matmul" => {
            if args.len() != 2 {
                return Err(format!("condition '{c}' takes two variables"));
            }
            let (a, b) = (parse_var(args[0])?, parse_var(args[1])?);
            match name {
                "same-shape" => Pred::SameShape(a, b),
                "lastdim" => Pred::LastDim(a, b),
                _ => Pred::FlattenedMatMul(a, b),
            }
        }
        other => {
            return Err(format!(
                "unknown condition '{other}' (const, nonconst, scalar, rank, same-shape)"
            ))
        }
    })
}

/// Splits a condition list at top-level commas.
fn split_conds(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (vec![], 0, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().filter(|c| !c.trim().is_empty()).collect()
}

fn parse_rule(line: &str) -> Result<Rule, String> {
    let (name, body) = line.split_once(':').ok_or("expected 'NAME: LHS => RHS'")?;
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("bad rule name '{name}'"));
    }
    let (lhs, rhs) = body
        .split_once("=>")
        .ok_or("expected '=>' between the two patterns")?;
    let (rhs, conds) = match rhs.split_once(" if ") {
        Some((r, c)) => (r, Some(c)),
        None => (rhs, None),
    };
    let lhs: Pattern<Op> = lhs
        .trim()
        .parse()
        .map_err(|e| format!("left-hand side: {e}"))?;
    let rhs: Pattern<Op> = rhs
        .trim()
        .parse()
        .map_err(|e| format!("right-hand side: {e}"))?;
    let bound = lhs.vars();
    for v in rhs.vars() {
        if !bound.contains(&v) {
            return Err(format!(
                "right-hand side uses {v}, which the left-hand side does not bind"
            ));
        }
    }
    let preds = conds
        .map(split_conds)
        .unwrap_or_default()
        .into_iter()
        .map(parse_pred)
        .collect::<Result<Vec<_>, _>>()?;
    for p in &preds {
        for v in Check(vec![p.clone()]).vars() {
            if !bound.contains(&v) {
                return Err(format!(
                    "condition uses {v}, which the left-hand side does not bind"
                ));
            }
        }
    }
    let applier: Box<dyn Applier<Op, Facts> + Send + Sync> = if preds.is_empty() {
        Box::new(rhs)
    } else {
        Box::new(ConditionalApplier {
            condition: Check(preds),
            applier: rhs,
        })
    };
    Rewrite::new(name, lhs, BoxedApplier(applier))
}

/// Lets a boxed applier be used where egg wants a concrete one.
struct BoxedApplier(Box<dyn Applier<Op, Facts> + Send + Sync>);

impl Applier<Op, Facts> for BoxedApplier {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Op, Facts>,
        eclass: Id,
        subst: &Subst,
        searcher_ast: Option<&egg::PatternAst<Op>>,
        rule_name: egg::Symbol,
    ) -> Vec<Id> {
        self.0
            .apply_one(egraph, eclass, subst, searcher_ast, rule_name)
    }
    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

/// Parses a rules text; `origin` names it in errors (`FILE:LINE: problem`).
pub fn parse_rules(text: &str, origin: &str) -> Result<Vec<Rule>, String> {
    let mut rules = vec![];
    let mut names = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let r = parse_rule(line).map_err(|e| format!("{origin}:{}: {e}", i + 1))?;
        if !names.insert(r.name) {
            return Err(format!(
                "{origin}:{}: a rule named '{}' is already defined",
                i + 1,
                r.name
            ));
        }
        rules.push(r);
    }
    Ok(rules)
}

/// The built-in rules followed by the user's rule files.
pub fn load_rules(user_files: &[&Path]) -> Result<Vec<Rule>, String> {
    load_rules_with(&[], user_files)
}

/// The built-in rules, extra built-in rule sets (`(origin, text)`), then the user's files.
pub fn load_rules_with(extra: &[(&str, &str)], user_files: &[&Path]) -> Result<Vec<Rule>, String> {
    let mut rules = parse_rules(BUILTIN, "built-in lossless.rules")?;
    for (origin, text) in extra {
        rules.extend(parse_rules(text, origin)?);
    }
    for f in user_files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read rules file {}: {e}", f.display()))?;
        let more = parse_rules(&text, &f.display().to_string())?;
        for r in &more {
            if rules.iter().any(|b| b.name == r.name) {
                return Err(format!(
                    "{}: rule '{}' has the name of a built-in rule",
                    f.display(),
                    r.name
                ));
            }
        }
        rules.extend(more);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::parse_rules;

    #[test]
    fn malformed_conditions_are_errors_not_panics() {
        for cond in [
            "const)?x(",
            "const(?x",
            "rank)?x(=2",
            "same-shape(?x)",
            ")(",
        ] {
            let text = format!("r: (neg ?x) => ?x if {cond}\n");
            let e = parse_rules(&text, "mine.rules").unwrap_err();
            assert!(e.contains("mine.rules:1"), "{cond}: {e}");
        }
    }
}
