//! Where to break: the capture strategies (issue 5, "Choose where to break").
//!
//! - `special-pool`: a breakpoint on the function that serves special pool: nt!MmAllocateSpecialPool
//!   on classic kernels (XP .. Windows 10 1803), nt!ExAllocateHeapSpecialPool on segment-heap
//!   kernels (1903+), where MmAllocateSpecialPool is still in the PDB but never called.
//! - `pool-hit-tag`: write the tag into nt!PoolHitTag; the kernel itself breaks (in
//!   DbgBreakPoint) on every allocation and free of the tag. No reboot, no special pool.
//! - `breakpoint=SYMBOL`: a breakpoint anywhere; hits are filtered by the tag argument when the
//!   function's signature is known.
//! - `auto`: special pool where the kernel has a special-pool allocator it calls, chosen by the
//!   kernel's shape: a kernel with ExAllocateHeapSpecialPool is the modern one.

use std::fmt;
use std::str::FromStr;

use kdpilot_symbols::ModuleSet;

/// What the user asked for (`--strategy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrategyChoice {
    /// Decide from the kernel.
    Auto,
    /// Breakpoint on the special-pool allocator.
    SpecialPool,
    /// nt!PoolHitTag.
    PoolHitTag,
    /// A breakpoint on this symbol, filtered by tag where the signature is known.
    Breakpoint(String),
}

/// `--strategy` could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown strategy `{0}`: use auto, special-pool, pool-hit-tag or breakpoint=MODULE!FUNCTION"
)]
pub struct StrategyParseError(String);

impl FromStr for StrategyChoice {
    type Err = StrategyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(StrategyChoice::Auto),
            "special-pool" => Ok(StrategyChoice::SpecialPool),
            "pool-hit-tag" => Ok(StrategyChoice::PoolHitTag),
            other => match other.strip_prefix("breakpoint=") {
                Some(sym) if !sym.trim().is_empty() => {
                    Ok(StrategyChoice::Breakpoint(sym.trim().to_string()))
                }
                _ => Err(StrategyParseError(other.to_string())),
            },
        }
    }
}

impl fmt::Display for StrategyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrategyChoice::Auto => f.write_str("auto"),
            StrategyChoice::SpecialPool => f.write_str("special-pool"),
            StrategyChoice::PoolHitTag => f.write_str("pool-hit-tag"),
            StrategyChoice::Breakpoint(s) => write!(f, "breakpoint={s}"),
        }
    }
}

/// Where a function's arguments are: index of the tag, size and pool type (0 = first argument:
/// rcx on x64, [esp+4] on x86 stdcall).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgLayout {
    /// The pool tag.
    pub tag: Option<u8>,
    /// The size in bytes.
    pub size: Option<u8>,
    /// POOL_TYPE (or POOL_FLAGS).
    pub pool_type: Option<u8>,
}

/// The argument layout of the kernel's pool functions (WRK and decompiled kernels; field notes).
pub fn arg_layout(function: &str) -> ArgLayout {
    let f = function.rsplit('!').next().unwrap_or(function);
    let l = |tag, size, pool_type| ArgLayout {
        tag: Some(tag),
        size: Some(size),
        pool_type: Some(pool_type),
    };
    match f {
        // (PoolType, NumberOfBytes, Tag [, ...])
        "ExAllocatePoolWithTag"
        | "ExAllocatePoolWithQuotaTag"
        | "ExAllocatePoolWithTagPriority" => l(2, 1, 0),
        // (Flags, NumberOfBytes, Tag [, ...])
        "ExAllocatePool2" | "ExAllocatePool3" => l(2, 1, 0),
        // (PoolType, Size, Tag, Node)
        "ExAllocateHeapPool" | "ExAllocateHeapSpecialPool" => l(2, 1, 0),
        // (NumberOfBytes, Tag, PoolType, SpecialPoolType)
        "MmAllocateSpecialPool" => l(1, 0, 2),
        // (P, Tag)
        "ExFreePoolWithTag" => ArgLayout {
            tag: Some(1),
            size: None,
            pool_type: None,
        },
        _ => ArgLayout {
            tag: None,
            size: None,
            pool_type: None,
        },
    }
}

/// What the capture will do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Plant a breakpoint at `address` (`symbol`); filter hits by the tag argument when known.
    Breakpoint {
        /// Where.
        address: u64,
        /// `module!function`.
        symbol: String,
        /// Argument positions.
        args: ArgLayout,
        /// Why this was chosen (shown to the user and logged).
        why: String,
    },
    /// Set nt!PoolHitTag (at `address`) to the tag; restore the old value at the end.
    PoolHitTag {
        /// Address of the ULONG.
        address: u64,
        /// Why.
        why: String,
    },
}

impl Plan {
    /// Why this plan was chosen.
    pub fn why(&self) -> &str {
        match self {
            Plan::Breakpoint { why, .. } | Plan::PoolHitTag { why, .. } => why,
        }
    }

    /// A short name for logs (`nt!ExAllocateHeapSpecialPool`, `nt!PoolHitTag`).
    pub fn target(&self) -> String {
        match self {
            Plan::Breakpoint { symbol, .. } => symbol.clone(),
            Plan::PoolHitTag { .. } => "nt!PoolHitTag".to_string(),
        }
    }
}

/// No plan could be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StrategyError {
    /// A needed symbol is not in the loaded symbols.
    #[error("{symbol} is not in the symbols of the target ({detail}). {advice}")]
    MissingSymbol {
        /// The symbol.
        symbol: String,
        /// What the symbol lookup said.
        detail: String,
        /// Which strategies would work.
        advice: String,
    },
}

/// The module part of `module!symbol`, when that module is not loaded (a driver that loads
/// later: the breakpoint waits for it, as WinDbg's `bu` does).
pub fn unloaded_module(modules: &ModuleSet, symbol: &str) -> Option<String> {
    match modules.resolve(symbol) {
        Err(kdpilot_symbols::NameError::UnknownModule(m)) => Some(m),
        _ => None,
    }
}

fn resolve(modules: &ModuleSet, symbol: &str) -> Result<u64, String> {
    modules.resolve(symbol).map_err(|e| e.to_string())
}

/// The strategies that would work with these symbols, for error messages.
fn working(modules: &ModuleSet) -> String {
    let mut ok = Vec::new();
    if resolve(modules, "nt!ExAllocateHeapSpecialPool").is_ok()
        || resolve(modules, "nt!MmAllocateSpecialPool").is_ok()
    {
        ok.push("--strategy special-pool");
    }
    if resolve(modules, "nt!PoolHitTag").is_ok() {
        ok.push("--strategy pool-hit-tag");
    }
    if resolve(modules, "nt!ExAllocatePoolWithTag").is_ok() {
        ok.push("--strategy breakpoint=nt!ExAllocatePoolWithTag (stops the machine on every allocation: slow over serial)");
    }
    if ok.is_empty() {
        let fix = "give --symbols or set _NT_SYMBOL_PATH, e.g. \
                   srv*C:\\symbols*https://msdl.microsoft.com/download/symbols";
        match modules.modules().iter().find(|m| m.name == "nt").map(|m| &m.symbol_status) {
            Some(kdpilot_symbols::SymbolStatus::Deferred) | None => format!(
                "No pool function resolves: kdpilot had no symbol path to look in; {fix}"
            ),
            Some(status) => format!(
                "No pool function resolves: the kernel has {status}; {fix} (a store or server that has that PDB)"
            ),
        }
    } else {
        format!("Strategies that would work: {}", ok.join(", "))
    }
}

/// Makes the plan for `choice` from the target's symbols.
pub fn plan(choice: &StrategyChoice, modules: &ModuleSet) -> Result<Plan, StrategyError> {
    let missing = |symbol: &str, detail: String| StrategyError::MissingSymbol {
        symbol: symbol.to_string(),
        detail,
        advice: working(modules),
    };
    let breakpoint = |symbol: &str, why: String| -> Result<Plan, StrategyError> {
        let address = resolve(modules, symbol).map_err(|d| missing(symbol, d))?;
        Ok(Plan::Breakpoint {
            address,
            symbol: symbol.to_string(),
            args: arg_layout(symbol),
            why,
        })
    };
    match choice {
        StrategyChoice::Breakpoint(symbol) => {
            breakpoint(symbol, format!("--strategy breakpoint={symbol}"))
        }
        StrategyChoice::PoolHitTag => {
            let address =
                resolve(modules, "nt!PoolHitTag").map_err(|d| missing("nt!PoolHitTag", d))?;
            Ok(Plan::PoolHitTag {
                address,
                why: "--strategy pool-hit-tag: the kernel breaks on every allocation and free of the tag".into(),
            })
        }
        StrategyChoice::SpecialPool | StrategyChoice::Auto => {
            let modern = resolve(modules, "nt!ExAllocateHeapSpecialPool").is_ok();
            if modern {
                breakpoint(
                    "nt!ExAllocateHeapSpecialPool",
                    "the kernel has the segment-heap pool (Windows 10 1903 and later): special pool is served by \
                     nt!ExAllocateHeapSpecialPool and nt!MmAllocateSpecialPool is never called"
                        .into(),
                )
            } else {
                breakpoint(
                    "nt!MmAllocateSpecialPool",
                    "the kernel has the classic pool (XP .. Windows 10 1803): ExAllocatePoolWithTag calls \
                     nt!MmAllocateSpecialPool for the special-pool tag"
                        .into(),
                )
            }
        }
    }
}
