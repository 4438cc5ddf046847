//! The postfix language of x86 "new FPO" program strings, e.g.
//! `$T0 .raSearch = $eip $T0 ^ = $esp $T0 4 + =`.
//!
//! Tokens are separated by whitespace. Operands are decimal (or `0x` hex) numbers, registers and
//! temporaries (`$eip`, `$T0`) and the special values (`.raSearch`, `.cbLocals`, ...). Operators:
//! `+ - * / %` (32-bit wrapping), `@` (align down: `a b @` is `a & !(b - 1)`), `^` (read the
//! dword at an address) and `=` (assign to the variable below the value). Every input is
//! bounded: program length, token count and stack depth; reads go through a callback that may
//! answer "not available yet" so the caller can fetch memory and evaluate again.

use std::collections::HashMap;

/// The longest program accepted.
pub const MAX_PROGRAM_LEN: usize = 4096;
/// The most tokens evaluated.
pub const MAX_TOKENS: usize = 512;
/// The deepest evaluation stack.
pub const MAX_STACK: usize = 64;

/// Why a program could not be evaluated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// Too long, too many tokens, or too deep.
    #[error("program too large")]
    TooLarge,
    /// An operator found too few operands.
    #[error("stack underflow at {0:?}")]
    Underflow(String),
    /// A variable read before it was assigned.
    #[error("undefined variable {0}")]
    Undefined(String),
    /// `=` without a variable to assign to, or a malformed token.
    #[error("syntax error at {0:?}")]
    Syntax(String),
    /// Division or modulo by zero, or alignment to zero.
    #[error("division by zero")]
    DivideByZero,
    /// The dword at this address is not available (the caller may fetch it and retry).
    #[error("memory at {0:#x} not available")]
    Memory(u32),
}

#[derive(Clone, Debug)]
enum Item<'a> {
    Value(u32),
    Name(&'a str),
}

fn is_variable(tok: &str) -> bool {
    (tok.starts_with('$') || tok.starts_with('.'))
        && tok.len() > 1
        && tok[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_number(tok: &str) -> Option<u32> {
    let (neg, body) = match tok.strip_prefix('-') {
        Some(rest) if !rest.is_empty() => (true, rest),
        _ => (false, tok),
    };
    let v = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()?
    } else {
        body.parse::<u32>().ok()?
    };
    Some(if neg { v.wrapping_neg() } else { v })
}

/// Evaluates `program` over `vars` (read and assigned), reading dwords through `read`.
/// `read` returns `None` for memory it does not have; evaluation then stops with
/// [`EvalError::Memory`] and `vars` may be partly updated (evaluate again on a fresh copy).
pub fn evaluate(
    program: &str,
    vars: &mut HashMap<String, u32>,
    read: &mut dyn FnMut(u32) -> Option<u32>,
) -> Result<(), EvalError> {
    if program.len() > MAX_PROGRAM_LEN {
        return Err(EvalError::TooLarge);
    }
    let mut stack: Vec<Item<'_>> = Vec::new();
    for (count, tok) in program.split_whitespace().enumerate() {
        if count >= MAX_TOKENS {
            return Err(EvalError::TooLarge);
        }
        let underflow = || EvalError::Underflow(tok.to_string());
        match tok {
            "+" | "-" | "*" | "/" | "%" | "@" => {
                let b = pop_value(&mut stack, vars, tok)?;
                let a = pop_value(&mut stack, vars, tok)?;
                let v = match tok {
                    "+" => a.wrapping_add(b),
                    "-" => a.wrapping_sub(b),
                    "*" => a.wrapping_mul(b),
                    "/" => a.checked_div(b).ok_or(EvalError::DivideByZero)?,
                    "%" => a.checked_rem(b).ok_or(EvalError::DivideByZero)?,
                    _ => {
                        if b == 0 {
                            return Err(EvalError::DivideByZero);
                        }
                        a & !(b.wrapping_sub(1))
                    }
                };
                stack.push(Item::Value(v));
            }
            "^" => {
                let addr = pop_value(&mut stack, vars, tok)?;
                let v = read(addr).ok_or(EvalError::Memory(addr))?;
                stack.push(Item::Value(v));
            }
            "=" => {
                let value = pop_value(&mut stack, vars, tok)?;
                match stack.pop() {
                    Some(Item::Name(name)) => {
                        vars.insert(name.to_string(), value);
                    }
                    Some(Item::Value(_)) => return Err(EvalError::Syntax(tok.to_string())),
                    None => return Err(underflow()),
                }
            }
            _ if is_variable(tok) => stack.push(Item::Name(tok)),
            _ => match parse_number(tok) {
                Some(v) => stack.push(Item::Value(v)),
                None => return Err(EvalError::Syntax(tok.chars().take(32).collect())),
            },
        }
        if stack.len() > MAX_STACK {
            return Err(EvalError::TooLarge);
        }
    }
    Ok(())
}

fn pop_value(
    stack: &mut Vec<Item<'_>>,
    vars: &HashMap<String, u32>,
    tok: &str,
) -> Result<u32, EvalError> {
    match stack.pop() {
        Some(Item::Value(v)) => Ok(v),
        Some(Item::Name(n)) => vars
            .get(n)
            .copied()
            .ok_or_else(|| EvalError::Undefined(n.to_string())),
        None => Err(EvalError::Underflow(tok.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        program: &str,
        vars: &[(&str, u32)],
        mem: &[(u32, u32)],
    ) -> Result<HashMap<String, u32>, EvalError> {
        let mut v: HashMap<String, u32> = vars.iter().map(|(k, x)| (k.to_string(), *x)).collect();
        let mem: HashMap<u32, u32> = mem.iter().copied().collect();
        evaluate(program, &mut v, &mut |a| mem.get(&a).copied())?;
        Ok(v)
    }

    #[test]
    fn fpo_entry_program() {
        let v = run(
            "$T0 .raSearch = $eip $T0 ^ = $esp $T0 4 + =",
            &[(".raSearch", 0x1000), ("$esp", 0x1000)],
            &[(0x1000, 0xdead)],
        )
        .unwrap();
        assert_eq!(v["$eip"], 0xdead);
        assert_eq!(v["$esp"], 0x1004);
        assert_eq!(v["$T0"], 0x1000);
    }

    #[test]
    fn ebp_frame_program_restores_saved_registers() {
        let v = run(
            "$T0 $ebp 4 + = $eip $T0 ^ = $esp $T0 4 + = $ebp $T0 4 - ^ = $ebx $T0 8 - ^ =",
            &[("$ebp", 0x2000)],
            &[(0x2004, 0x401234), (0x2000, 0x3000), (0x1ffc, 0x77)],
        )
        .unwrap();
        assert_eq!(v["$eip"], 0x401234);
        assert_eq!(v["$esp"], 0x2008);
        assert_eq!(v["$ebp"], 0x3000);
        assert_eq!(v["$ebx"], 0x77);
    }

    #[test]
    fn realignment_and_arithmetic() {
        let v = run(
            "$T1 $ebp 4 + = $T0 $T1 16 - 8 @ = $x 7 3 % 10 2 / * -1 + =",
            &[("$ebp", 0x1017)],
            &[],
        )
        .unwrap();
        assert_eq!(v["$T1"], 0x101b);
        assert_eq!(v["$T0"], 0x1008);
        assert_eq!(v["$x"], 4);
    }

    #[test]
    fn errors_not_panics() {
        assert_eq!(run("+", &[], &[]), Err(EvalError::Underflow("+".into())));
        assert_eq!(run("$a 1 0 / =", &[], &[]), Err(EvalError::DivideByZero));
        assert_eq!(run("$a 1 0 @ =", &[], &[]), Err(EvalError::DivideByZero));
        assert_eq!(run("1 2 =", &[], &[]), Err(EvalError::Syntax("=".into())));
        assert_eq!(
            run("$a $b =", &[], &[]),
            Err(EvalError::Undefined("$b".into()))
        );
        assert_eq!(run("$a 5 ^ =", &[], &[]), Err(EvalError::Memory(5)));
        assert!(matches!(
            run("$a foo =", &[], &[]),
            Err(EvalError::Syntax(_))
        ));
        assert_eq!(run(&"1 ".repeat(100), &[], &[]), Err(EvalError::TooLarge));
        assert_eq!(
            run(&"1 + ".repeat(1000), &[], &[]),
            Err(EvalError::Underflow("+".into()))
        );
        assert_eq!(run(&"x".repeat(5000), &[], &[]), Err(EvalError::TooLarge));
        assert_eq!(run("$a 4294967295 1 + =", &[], &[]).unwrap()["$a"], 0);
        assert_eq!(run("$a 0x10 -1 + =", &[], &[]).unwrap()["$a"], 15);
        assert!(run("", &[], &[]).unwrap().is_empty());
    }
}
