//! TypeScript cells become JavaScript here, in the agent, so that TypeScript runs on the same
//! Node kernel as JavaScript (no Bun needed, and Node 20 has no type stripping of its own).
//!
//! Types are erased with `swc_ts_fast_strip`, the stripper Node itself ships (through amaro):
//! first in its strip-only mode, which replaces types with blanks and so keeps every line and
//! column of the cell (stack traces point at the user's own code); a cell with syntax that needs
//! code generated (enums, namespaces, parameter properties) goes through its transform mode. A
//! type error is not an error (nothing checks types); a syntax error comes back as a
//! [`SyntaxError`] the kernel reports like any other error of the cell.

use std::sync::{Arc, Mutex};

use swc_common::errors::{DiagnosticBuilder, Emitter, Handler, HANDLER};
use swc_common::sync::Lrc;
use swc_common::{Globals, SourceMap, GLOBALS};
use swc_ts_fast_strip::{ErrorCode, Options};

/// Stack reserved for one strip. swc's parser and passes recurse on the nesting of the code;
/// the agent is PID 1 of the sandbox, so a stack overflow would take the whole sandbox down.
/// Reserved, not committed: only the pages a cell really needs are touched.
const STRIP_STACK: usize = 256 << 20;
/// Deepest bracket nesting accepted. Far beyond any hand-written code, and well within
/// [`STRIP_STACK`] for every pass.
const MAX_NESTING: usize = 2_000;

/// A cell that is not valid TypeScript.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    /// What is wrong, as the parser says it.
    pub message: String,
    /// 1-based line of the first error in the cell, when known.
    pub line: Option<usize>,
    /// 1-based column of the first error, when known.
    pub column: Option<usize>,
    /// Traceback lines in the shape the JavaScript kernel gives compile errors:
    /// `cell[N]:line:column`, the offending line, a caret, `SyntaxError: message`.
    pub traceback: Vec<String>,
}

/// One diagnostic of the parser: its message and where it points.
#[derive(Debug, Clone)]
struct Diagnostic {
    message: String,
    lo: Option<swc_common::BytePos>,
}

/// Collects the handler's diagnostics instead of printing them.
struct Collect(Arc<Mutex<Vec<Diagnostic>>>);

impl Emitter for Collect {
    fn emit(&mut self, db: &mut DiagnosticBuilder<'_>) {
        let d = Diagnostic {
            message: db.message(),
            lo: db.span.primary_span().map(|s| s.lo),
        };
        match self.0.lock() {
            Ok(mut g) => g.push(d),
            Err(p) => p.into_inner().push(d),
        }
    }
}

/// JavaScript for the TypeScript `code` of cell `filename` (e.g. `cell[3]`, used in messages).
///
/// Runs on a thread of its own with a large stack (see [`STRIP_STACK`]); blocking, so call it
/// from a blocking context.
pub fn strip(code: &str, filename: &str) -> Result<String, SyntaxError> {
    if let Some((line, column)) = too_deep(code) {
        return Err(syntax_error(
            code,
            filename,
            format!("the code nests brackets deeper than {MAX_NESTING} levels"),
            Some((line, column)),
        ));
    }
    let code = code.to_string();
    let name = filename.to_string();
    let worker = std::thread::Builder::new()
        .name("ts-strip".into())
        .stack_size(STRIP_STACK)
        .spawn(move || strip_here(&code, &name));
    match worker.map(|h| h.join()) {
        Ok(Ok(result)) => result,
        // A panic in swc (a bug there) is an error of this cell, not of the agent.
        Ok(Err(_)) => Err(SyntaxError {
            message: "the TypeScript stripper failed on this cell".into(),
            line: None,
            column: None,
            traceback: vec!["SyntaxError: the TypeScript stripper failed on this cell".into()],
        }),
        Err(e) => Err(SyntaxError {
            message: format!("no thread to strip types on: {e}"),
            line: None,
            column: None,
            traceback: vec![format!("SyntaxError: no thread to strip types on: {e}")],
        }),
    }
}

/// [`strip`], for a program run on its own (`node -e`): also whether the JavaScript is an ES
/// module (it has `import`/`export` declarations or top-level `await`), which Node must be
/// told (`--input-type=module`); otherwise it is a CommonJS script, where `require` works.
pub fn strip_program(code: &str, filename: &str) -> Result<(String, bool), SyntaxError> {
    let js = strip(code, filename)?;
    let probe = js.clone();
    let module = std::thread::Builder::new()
        .name("ts-strip".into())
        .stack_size(STRIP_STACK)
        .spawn(move || is_module(&probe))
        .ok()
        .and_then(|h| h.join().ok())
        .unwrap_or(false);
    Ok((js, module))
}

/// Whether JavaScript (valid already: it came out of the stripper) needs module grammar.
fn is_module(js: &str) -> bool {
    use swc_ecma_parser::{Parser, StringInput, Syntax};
    let cm: Lrc<SourceMap> = Default::default();
    GLOBALS.set(&Globals::new(), || {
        let fm = cm.new_source_file(swc_common::FileName::Anon.into(), js.to_string());
        let mut parser = Parser::new(
            Syntax::Es(Default::default()),
            StringInput::from(&*fm),
            None,
        );
        matches!(parser.parse_program(), Ok(swc_ecma_ast::Program::Module(_)))
    })
}

fn strip_here(code: &str, filename: &str) -> Result<String, SyntaxError> {
    match run_swc(code, filename, "strip-only") {
        Ok(js) => Ok(js),
        // Enums, namespaces, parameter properties: code must be generated for them.
        Err(Failure::Unsupported) => match run_swc(code, filename, "transform") {
            Ok(js) => Ok(js),
            Err(Failure::Unsupported) => Err(syntax_error(
                code,
                filename,
                "unsupported TypeScript syntax".into(),
                None,
            )),
            Err(Failure::Syntax(d)) => Err(from_diagnostic(code, filename, d)),
        },
        Err(Failure::Syntax(d)) => Err(from_diagnostic(code, filename, d)),
    }
}

enum Failure {
    /// Valid TypeScript the strip-only mode cannot erase.
    Unsupported,
    /// Not valid TypeScript: the first diagnostic, with its position in the cell.
    Syntax(Option<(String, Option<(usize, usize)>)>),
}

fn run_swc(code: &str, filename: &str, mode: &str) -> Result<String, Failure> {
    // Built from JSON: the options are the ones the stripper's own JavaScript API takes, and
    // its configuration types are not all re-exported.
    let options: Options = serde_json::from_value(serde_json::json!({
        "filename": filename,
        "mode": mode,
        "transform": {
            // Imports stay as written: one cell imports what later cells use, so eliding an
            // import unused in its own cell would lose it.
            "verbatimModuleSyntax": true,
            "nativeClassProperties": true,
            "noEmptyExport": true,
            "importExportAssignConfig": "Preserve",
        },
    }))
    .map_err(|_| Failure::Unsupported)?;
    let cm: Lrc<SourceMap> = Default::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Handler::with_emitter(true, false, Box::new(Collect(seen.clone())));
    let result = GLOBALS.set(&Globals::new(), || {
        HANDLER.set(&handler, || {
            swc_ts_fast_strip::operate(&cm, &handler, code.to_string(), options)
        })
    });
    match result {
        Ok(out) => Ok(out.code),
        Err(e) => {
            let first = seen
                .lock()
                .map(|g| g.first().cloned())
                .unwrap_or_else(|p| p.into_inner().first().cloned());
            let position = |d: &Diagnostic| {
                d.lo.and_then(|lo| cm.try_lookup_char_pos(lo).ok())
                    .map(|loc| (loc.line, loc.col_display + 1))
            };
            match e.code {
                ErrorCode::UnsupportedSyntax if mode == "strip-only" => Err(Failure::Unsupported),
                _ => Err(Failure::Syntax(first.map(|d| {
                    let at = position(&d);
                    (d.message, at)
                }))),
            }
        }
    }
}

fn from_diagnostic(
    code: &str,
    filename: &str,
    d: Option<(String, Option<(usize, usize)>)>,
) -> SyntaxError {
    match d {
        Some((message, at)) => syntax_error(code, filename, message, at),
        None => syntax_error(code, filename, "invalid TypeScript".into(), None),
    }
}

fn syntax_error(
    code: &str,
    filename: &str,
    message: String,
    at: Option<(usize, usize)>,
) -> SyntaxError {
    let mut traceback = Vec::new();
    if let Some((line, column)) = at {
        traceback.push(format!("{filename}:{line}:{column}"));
        if let Some(text) = code.lines().nth(line.saturating_sub(1)) {
            traceback.push(text.to_string());
            traceback.push(format!("{}^", " ".repeat(column.saturating_sub(1))));
        }
    }
    traceback.push(format!("SyntaxError: {message}"));
    SyntaxError {
        message,
        line: at.map(|a| a.0),
        column: at.map(|a| a.1),
        traceback,
    }
}

/// Where bracket nesting first passes [`MAX_NESTING`] (1-based line and column); a rough count
/// (brackets in strings and comments count too), which only errs on the side of refusing
/// absurd input.
fn too_deep(code: &str) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    for c in code.chars() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
            }
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some((line, column));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_erased_in_place() {
        let js = strip(
            "interface P { v: number }\nconst p: P = { v: 1 } as P;\nfunction id<T>(x: T): T { return x }\np.v",
            "cell[1]",
        )
        .expect("valid");
        // Strip-only keeps lines where they were.
        assert_eq!(js.lines().count(), 4, "{js}");
        assert!(js.contains("const p") && !js.contains(": P"), "{js}");
        assert!(!js.contains("interface"), "{js}");
        assert!(js.lines().nth(3).is_some_and(|l| l.trim() == "p.v"), "{js}");
    }

    #[test]
    fn enums_and_namespaces_are_transformed() {
        let js = strip(
            "enum Color { Red, Green = 5 }\nnamespace N { export const k = 1 }\nColor.Green + N.k",
            "cell[2]",
        )
        .expect("valid");
        assert!(js.contains("Color"), "{js}");
        assert!(!js.contains("enum "), "{js}");
    }

    #[test]
    fn imports_are_kept_even_when_unused_in_the_cell() {
        let js = strip("import fs from 'fs';\nconst n: number = 1;", "cell[1]").expect("valid");
        assert!(js.contains("import fs from 'fs'"), "{js}");
        let js = strip(
            "import type { Foo } from './foo';\nenum E { A }\nimport os from 'os';",
            "cell[1]",
        )
        .expect("valid");
        assert!(
            js.contains("import os from 'os'") && !js.contains("Foo"),
            "{js}"
        );
    }

    #[test]
    fn top_level_await_is_fine() {
        let js = strip("const v: number = await Promise.resolve(1);\nv", "cell[1]").expect("valid");
        assert!(js.contains("await Promise.resolve(1)"), "{js}");
    }

    #[test]
    fn programs_with_module_syntax_are_told_apart() {
        let module = |c: &str| strip_program(c, "eval").expect("valid").1;
        assert!(!module(
            "const n: number = 1;\nconsole.log(require('os').EOL)"
        ));
        assert!(module("import os from 'os';\nconsole.log(os.EOL)"));
        assert!(module("const v: number = await Promise.resolve(1);"));
        assert!(module("export const k = 1;"));
    }

    #[test]
    fn a_type_error_is_not_an_error() {
        strip("const n: number = 'a string';\nn", "cell[1]").expect("types are not checked");
    }

    #[test]
    fn syntax_errors_name_the_place() {
        let e = strip("const ok = 1;\nconst = 2;", "cell[4]").expect_err("invalid");
        assert_eq!(e.line, Some(2), "{e:?}");
        assert!(!e.message.is_empty());
        assert_eq!(
            e.traceback[0],
            format!("cell[4]:2:{}", e.column.unwrap_or(0))
        );
        assert_eq!(e.traceback[1], "const = 2;");
        assert!(
            e.traceback
                .last()
                .is_some_and(|l| l.starts_with("SyntaxError: ")),
            "{e:?}"
        );
    }

    #[test]
    fn absurd_nesting_is_refused_not_a_crash() {
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        let e = strip(&deep, "cell[1]").expect_err("too deep");
        assert!(e.message.contains("nests"), "{e:?}");
        // Long flat chains recurse too (left-deep binary expressions).
        let long = format!("{}1", "1 + ".repeat(200_000));
        strip(&long, "cell[1]").expect("a long expression is fine");
    }
}
