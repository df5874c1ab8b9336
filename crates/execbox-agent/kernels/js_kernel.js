'use strict';
// execbox REPL kernel for JavaScript and TypeScript, run by node or bun:
//   node|bun js_kernel.js javascript|typescript [stripped]
// `typescript stripped`: the agent erases the types of each cell before sending
// it (execbox-agent's typescript.rs), so the cells arrive as JavaScript; plain
// `typescript` transpiles here (bun, or node >= 22.13).
// fd 1/2: the cells' own output (written synchronously, so it is on the pipes
// before any control message about the cell is sent).
// fd 3: control channel, newline-delimited JSON.
//   kernel -> agent: {"ev":"ready",...} once, then per execute: display*, result?,
//                    error?, and always {"ev":"done","execution_count":N,"ok":bool}
//   agent -> kernel: {"op":"execute","code":"..."}, or with "error":{ename,evalue,
//                    traceback} for a cell the agent could not compile: it counts
//                    as an execution that failed with that error.
// SIGINT interrupts the running cell (vm breakOnSigint for synchronous code; a
// pending top-level await is abandoned); when idle it is ignored.

// Everything the kernel needs is captured here, because cells run in this same
// global scope and may overwrite globals (`let JSON = 1` becomes a global var).
const fs = require('fs');
const vm = require('vm');
const util = require('util');
const path = require('path');
const Module = require('module');
const { Console } = require('console');
const { Writable } = require('stream');
const { pathToFileURL } = require('url');
const { JSON: _JSON, Promise: _Promise, Error: _Error, Buffer: _Buffer, Atomics: _Atomics } = globalThis;
const proc = process;

const isBun = typeof Bun !== 'undefined';
const mode = proc.argv[2] === 'typescript' ? 'typescript' : 'javascript';
const strippedByAgent = mode === 'typescript' && proc.argv[3] === 'stripped';
const KERNEL_FILE = __filename;
const CTRL_FD = 3;

// ---------------------------------------------------------------- raw output
const sleepCell = new Int32Array(new SharedArrayBuffer(4));

// write(2) everything, synchronously. An fd may have been made non-blocking
// (libuv does that to fd 3 under node), so EAGAIN is retried after 1 ms.
function writeAll(fd, data) {
  const buf = typeof data === 'string' ? _Buffer.from(data, 'utf8') : data;
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      if (e.code === 'EAGAIN') _Atomics.wait(sleepCell, 0, 0, 1);
      else throw e;
    }
  }
}

function send(msg) {
  try {
    writeAll(CTRL_FD, _JSON.stringify(msg) + '\n');
  } catch (e) {
    // The agent is gone: nothing left to serve.
    proc.exit(0);
  }
}

// process.stdout/stderr of node are asynchronous on pipes and bun's are
// buffered; a cell's output must reach fd 1/2 before its "done", so both are
// replaced by streams whose write() is a synchronous write(2).
function syncStream(fd) {
  const s = new Writable({ write(chunk, enc, cb) { cb(); } });
  s.write = function write(chunk, encoding, cb) {
    if (typeof encoding === 'function') { cb = encoding; encoding = undefined; }
    try {
      if (typeof chunk === 'string') writeAll(fd, _Buffer.from(chunk, encoding || 'utf8'));
      else writeAll(fd, _Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    } catch (e) {
      // EPIPE etc.: the reader is gone; output is best effort.
    }
    if (cb) proc.nextTick(cb);
    return true;
  };
  // Ending or destroying fd 1/2 from a cell would silence every later cell.
  s.end = function end(chunk, encoding, cb) {
    if (typeof chunk === 'function') { cb = chunk; chunk = undefined; }
    if (chunk != null) s.write(chunk, encoding);
    if (typeof encoding === 'function') cb = encoding;
    if (cb) proc.nextTick(cb);
    return s;
  };
  s.destroy = function destroy() { return s; };
  s.fd = fd;
  s.isTTY = false;
  return s;
}

const stdout = syncStream(1);
const stderr = syncStream(2);
for (const [name, stream] of [['stdout', stdout], ['stderr', stderr]]) {
  Object.defineProperty(proc, name, { value: stream, configurable: true, enumerable: true, writable: true });
}
const cellConsole = new Console({ stdout, stderr, colorMode: false });
globalThis.console = cellConsole;

const inspect = (v) => util.inspect(v);

// ----------------------------------------------------------- module loading
const cwd = proc.cwd();
// Like the node REPL: require() resolves from the cwd, then from the global
// package folders (npm -g, bun -g, NODE_PATH), which node does not search.
const globalDirs = [...new Set([
  ...(proc.env.NODE_PATH || '').split(path.delimiter),
  path.resolve(path.dirname(proc.execPath), '..', 'lib', 'node_modules'),
  '/usr/local/lib/node_modules',
  '/usr/lib/node_modules',
  path.join(proc.env.HOME || '/nonexistent', '.bun', 'install', 'global', 'node_modules'),
].filter((d) => d && fs.existsSync(d)))];
const requirers = [Module.createRequire(path.join(cwd, '[repl]'))]
  .concat(globalDirs.map((d) => Module.createRequire(path.join(d, '[repl]'))));
const isBare = (id) => !(id.startsWith('.') || path.isAbsolute(id) || /^[a-zA-Z][a-zA-Z+.-]*:/.test(id));

function viaRequirers(id, method) {
  let first;
  for (let i = 0; i < requirers.length; i++) {
    try {
      return method(requirers[i], id);
    } catch (e) {
      if (e.code !== 'MODULE_NOT_FOUND' || !isBare(id)) throw e;
      if (!first) first = e;
    }
  }
  throw first;
}
function replRequire(id) { return viaRequirers(id, (r, i) => r(i)); }
replRequire.resolve = (id) => viaRequirers(id, (r, i) => r.resolve(i));
replRequire.cache = require.cache;
globalThis.require = replRequire;

const isBuiltin = Module.isBuiltin || ((s) => Module.builtinModules.includes(s.replace(/^node:/, '')));
// import() inside cells: relative paths against the cwd, bare names through
// the same lookup as require() (falling back to the runtime's own resolution).
function importFromCell(spec) {
  let target = spec;
  if (spec.startsWith('.') || path.isAbsolute(spec)) target = pathToFileURL(path.resolve(cwd, spec)).href;
  else if (isBare(spec) && !isBuiltin(spec)) {
    try { target = pathToFileURL(replRequire.resolve(spec)).href; } catch (e) { /* runtime resolution */ }
  }
  return import(target);
}

// Optional rich output: display(value) or display(value, 'text/html'), or a
// mime bundle {'text/html': ..., 'text/plain': ...}.
globalThis.display = function display(value, mime) {
  let data;
  if (typeof mime === 'string') data = { [mime]: typeof value === 'string' ? value : inspect(value) };
  else if (value && typeof value === 'object' && !Array.isArray(value) &&
    Object.keys(value).length > 0 && Object.keys(value).every((k) => k.includes('/'))) data = value;
  else data = { 'text/plain': inspect(value) };
  send({ ev: 'display', data });
};

// ---------------------------------------------------------------- tokenizer
// Cells are rewritten (REPL-style) so that top-level declarations become
// global vars: they persist across cells and can be redeclared, and
// top-level await works. That needs only the top-level statement structure,
// so a small tokenizer is enough (no parser dependency in a single file).
const KW_BEFORE_EXPR = new Set(['return', 'typeof', 'instanceof', 'in', 'of', 'new', 'delete', 'void',
  'throw', 'case', 'do', 'else', 'yield', 'await', 'extends']);
const PUNCTS = ['>>>=', '...', '===', '!==', '**=', '<<=', '>>=', '>>>', '&&=', '||=', '??=',
  '=>', '==', '!=', '<=', '>=', '&&', '||', '??', '?.', '++', '--', '+=', '-=', '*=', '/=', '%=',
  '&=', '|=', '^=', '**', '<<', '>>'];
const RE_ID = /[A-Za-z_$#\u0080-\uffff\\][\w$\u0080-\uffff\\]*/y;
const RE_NUM = /(?:0[xXoObB][\da-fA-F_]+n?|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?n?)/y;

// Returns [tokens, endIndex]; token = {t: id|num|str|tpl|re|p, v, s, e, nl}.
// With inTemplate, stops at the `}` closing a `${`.
function lex(src, i, inTemplate) {
  const toks = [];
  let depth = 0;
  let nl = false;
  const n = src.length;
  const regexAllowed = () => {
    const p = toks[toks.length - 1];
    if (!p) return true;
    if (p.t === 'num' || p.t === 'str' || p.t === 'tpl' || p.t === 're') return false;
    if (p.t === 'id') return KW_BEFORE_EXPR.has(p.v);
    return !(p.v === ')' || p.v === ']' || p.v === '}' || p.v === '++' || p.v === '--');
  };
  if (i === 0 && src.startsWith('#!')) while (i < n && src[i] !== '\n') i++;
  while (i < n) {
    const c = src[i];
    if (c === '\n' || c === '\r' || c === '\u2028' || c === '\u2029') { nl = true; i++; continue; }
    if (c === ' ' || c === '\t' || c === '\v' || c === '\f' || c === '\ufeff' || c === '\u00a0') { i++; continue; }
    if (c === '/' && src[i + 1] === '/') { while (i < n && src[i] !== '\n') i++; continue; }
    if (c === '/' && src[i + 1] === '*') {
      const j = src.indexOf('*/', i + 2);
      const end = j < 0 ? n : j + 2;
      if (src.slice(i, end).includes('\n')) nl = true;
      i = end;
      continue;
    }
    const s = i;
    let t;
    if (c === '"' || c === "'") {
      i++;
      while (i < n && src[i] !== c && src[i] !== '\n') i += src[i] === '\\' ? 2 : 1;
      i++;
      t = 'str';
    } else if (c === '`') {
      i++;
      while (i < n && src[i] !== '`') {
        if (src[i] === '\\') i += 2;
        else if (src[i] === '$' && src[i + 1] === '{') i = lex(src, i + 2, true)[1] + 1;
        else i++;
      }
      i++;
      t = 'tpl';
    } else if (c >= '0' && c <= '9' || (c === '.' && src[i + 1] >= '0' && src[i + 1] <= '9')) {
      RE_NUM.lastIndex = i;
      RE_NUM.exec(src);
      i = Math.max(RE_NUM.lastIndex, i + 1);
      t = 'num';
    } else if (/[A-Za-z_$#\u0080-\uffff\\]/.test(c)) {
      RE_ID.lastIndex = i;
      RE_ID.exec(src);
      i = Math.max(RE_ID.lastIndex, i + 1);
      t = 'id';
    } else if (c === '/' && regexAllowed()) {
      i++;
      let inClass = false;
      while (i < n && src[i] !== '\n') {
        const d = src[i];
        if (d === '\\') { i += 2; continue; }
        if (d === '[') inClass = true;
        else if (d === ']') inClass = false;
        else if (d === '/' && !inClass) break;
        i++;
      }
      i++;
      while (i < n && /[\w$]/.test(src[i])) i++;
      t = 're';
    } else {
      if (inTemplate) {
        if (c === '{') depth++;
        else if (c === '}') { if (depth === 0) return [toks, i]; depth--; }
      }
      const m = PUNCTS.find((q) => src.startsWith(q, i));
      i += m ? m.length : 1;
      t = 'p';
    }
    if (i > n) i = n;
    toks.push({ t, v: src.slice(s, i), s, e: i, nl });
    nl = false;
  }
  return [toks, i];
}

// ------------------------------------------------------ statement splitter
const NO_END_KW = new Set(['if', 'else', 'for', 'while', 'do', 'var', 'let', 'const', 'new', 'typeof',
  'delete', 'void', 'in', 'instanceof', 'case', 'default', 'throw', 'function', 'class', 'extends',
  'with', 'switch', 'try', 'catch', 'finally', 'import', 'export', 'await', 'yield']);
const HEADER_KW = new Set(['if', 'for', 'while', 'with', 'switch', 'catch']);
const BLOCK_STMT_KW = new Set(['if', 'for', 'while', 'with', 'switch', 'try', 'do', 'function', 'class']);

function matchBrackets(toks) {
  const match = new Array(toks.length).fill(-1);
  const stack = [];
  for (let i = 0; i < toks.length; i++) {
    const v = toks[i].t === 'p' ? toks[i].v : '';
    if (v === '(' || v === '[' || v === '{') stack.push(i);
    else if ((v === ')' || v === ']' || v === '}') && stack.length) {
      const o = stack.pop();
      match[o] = i;
      match[i] = o;
    }
  }
  return match;
}

const isP = (tk, v) => tk && tk.t === 'p' && tk.v === v;
const isId = (tk, v) => tk && tk.t === 'id' && (v === undefined || tk.v === v);

// Can the token end a statement (so that a newline after it may be ASI)?
function canEnd(tk) {
  if (tk.t === 'id') return !NO_END_KW.has(tk.v);
  if (tk.t !== 'p') return true;
  return tk.v === ')' || tk.v === ']' || tk.v === '}' || tk.v === '++' || tk.v === '--';
}
// Does a token at the start of a line continue the previous line's expression?
function continues(tk) {
  if (tk.t === 'tpl') return true;
  if (tk.t === 'id') return tk.v === 'in' || tk.v === 'instanceof';
  if (tk.t !== 'p') return false;
  return !(tk.v === '{' || tk.v === '++' || tk.v === '--' || tk.v === '!' || tk.v === '~' || tk.v === ';');
}

// Splits the top-level token list into statements: [start, end) index pairs
// (end includes a trailing `;`).
function splitStatements(toks, match) {
  const stmts = [];
  const n = toks.length;
  let start = 0;
  let headerClose = -1;
  let i = 0;
  while (i < n) {
    const tk = toks[i];
    if (i > start && tk.nl && i - 1 !== headerClose && canEnd(toks[i - 1]) && !continues(tk)) {
      stmts.push([start, i]);
      start = i;
    }
    if (tk.t === 'p' && (tk.v === '(' || tk.v === '[' || tk.v === '{') && match[i] > i) {
      const close = match[i];
      if (tk.v === '(') {
        const p = toks[i - 1];
        const pp = toks[i - 2];
        const doWhile = isId(p, 'while') && i - 2 >= start && isP(pp, '}') && isId(toks[start], 'do');
        if (i > start && !doWhile && p.t === 'id' && (HEADER_KW.has(p.v) || (p.v === 'await' && isId(pp, 'for')))) headerClose = close;
        i = close + 1;
        continue;
      }
      i = close + 1;
      if (tk.v === '{') {
        const first = toks[start];
        const blocky = isP(first, '{') || (first.t === 'id' && (BLOCK_STMT_KW.has(first.v) ||
          (first.v === 'async' && isId(toks[start + 1], 'function')) || isP(toks[start + 1], ':') || first.v === 'else'));
        const next = toks[i];
        const cont = next && next.t === 'id' && (next.v === 'else' || next.v === 'catch' || next.v === 'finally' ||
          (next.v === 'while' && isId(first, 'do')));
        // A block-bodied statement (if/for/function/class/...) ends at its
        // closing brace; an object literal or function expression does not.
        if (blocky && !cont && !(next && isP(next, ';'))) { stmts.push([start, i]); start = i; }
      }
      continue;
    }
    i++;
    if (tk.t === 'p' && tk.v === ';') { stmts.push([start, i]); start = i; }
  }
  if (start < n) stmts.push([start, n]);
  return stmts;
}

// Names bound by a binding pattern occupying toks[a..b).
function patternNames(toks, match, a, b, out) {
  if (a >= b) return out;
  const tk = toks[a];
  if (tk.t === 'id') { out.push(tk.v); return out; }
  if (!(isP(tk, '{') || isP(tk, '[')) || match[a] < a) return out;
  const obj = tk.v === '{';
  const close = Math.min(match[a], b);
  // split the elements at commas of this level
  let i = a + 1;
  while (i < close) {
    let j = i;
    while (j < close && !isP(toks[j], ',')) j = match[j] > j ? match[j] + 1 : j + 1;
    // element toks[i..j)
    let s = i;
    let e = j;
    if (s < e && isP(toks[s], '...')) s++;
    else if (obj) {
      // `key: pattern` or `[computed]: pattern` or shorthand `name = default`
      let k = s;
      if (isP(toks[k], '[') && match[k] > k) k = match[k] + 1; else k++;
      if (k < e && isP(toks[k], ':')) s = k + 1;
    }
    let d = s;
    while (d < e && !isP(toks[d], '=')) d = match[d] > d ? match[d] + 1 : d + 1;
    patternNames(toks, match, s, d, out);
    i = j + 1;
  }
  return out;
}

// ------------------------------------------------------------ cell rewrite
function isDeclStart(toks, s) {
  const a = toks[s];
  const b = toks[s + 1];
  if (isId(a, 'const') || isId(a, 'var')) return true;
  return isId(a, 'let') && b && (b.t === 'id' || isP(b, '[') || isP(b, '{'));
}
function isStaticImport(toks, s) {
  const b = toks[s + 1];
  return isId(toks[s], 'import') && b && !isP(b, '(') && !isP(b, '.');
}
function isExpressionStatement(toks, s) {
  const a = toks[s];
  const b = toks[s + 1];
  if (a.t === 'p') return a.v !== '{' && a.v !== ';';
  if (a.t !== 'id') return true;
  if (isP(b, ':') || isDeclStart(toks, s) || isStaticImport(toks, s)) return false;
  if (a.v === 'async' && isId(b, 'function') && !b.nl) return false;
  return !['function', 'class', 'if', 'for', 'while', 'do', 'try', 'switch', 'return', 'throw', 'break',
    'continue', 'export', 'debugger', 'with'].includes(a.v);
}

// Turns `import a, {b as c} from 'm'` into an assignment from `await import('m')`.
function rewriteImport(toks, match, s, e, hoist) {
  let i = s + 1;
  let spec = null;
  const props = [];
  let ns = null;
  while (i < e) {
    const tk = toks[i];
    if (tk.t === 'str') { spec = tk.v; break; }
    if (isId(tk, 'from')) { i++; continue; }
    if (isP(tk, '*') && isId(toks[i + 1], 'as')) { ns = toks[i + 2].v; i += 3; continue; }
    if (isP(tk, '{')) {
      const close = match[i];
      for (let k = i + 1; k < close; k++) {
        if (isP(toks[k], ',')) continue;
        const name = toks[k].v;
        if (isId(toks[k + 1], 'as')) { props.push(`${name}: ${toks[k + 2].v}`); hoist.push(toks[k + 2].v); k += 2; } else { props.push(name); hoist.push(name); }
      }
      i = close + 1;
      continue;
    }
    if (tk.t === 'id' && !isId(tk, 'type')) { props.push(`default: ${tk.v}`); hoist.push(tk.v); }
    i++;
  }
  if (spec === null) return null;
  const parts = [];
  if (ns) { hoist.push(ns); parts.push(`${ns} = __m`); }
  if (props.length) parts.push(`({${props.join(', ')}} = __m)`);
  return `await import(${spec}).then((__m) => { ${parts.join('; ')} });`;
}

// Rewrites a cell. Returns {code, isAsync}. In sync mode the script's
// completion value is the result; in async mode the cell body runs in an
// async arrow that returns {value: <last expression>}.
function rewrite(src, forceAsync) {
  const toks = lex(src, 0, false)[0];
  const match = matchBrackets(toks);
  const stmts = splitStatements(toks, match);
  const isAsync = forceAsync || toks.some((tk) => isId(tk, 'await')) ||
    stmts.some(([s]) => isStaticImport(toks, s));
  const edits = []; // [pos, deleteLength, insertText]
  const hoist = [];
  if (!MAIN_LOADER) {
    toks.forEach((tk, i) => {
      if (isId(tk, 'import') && isP(toks[i + 1], '(') && !isP(toks[i - 1], '.')) edits.push([tk.s, tk.e - tk.s, '__execbox_import']);
    });
  }
  for (let k = 0; k < stmts.length; k++) {
    const [s, e0] = stmts[k];
    const e = isP(toks[e0 - 1], ';') && e0 - 1 > s ? e0 - 1 : e0; // without the `;`
    const a = toks[s];
    if (isDeclStart(toks, s)) {
      if (!isAsync) {
        if (a.v !== 'var') edits.push([a.s, a.e - a.s, 'var']);
        continue;
      }
      // `let a = 1, {b} = o, c` -> `void (a = 1, {b} = o, c = undefined)`
      const parts = [];
      let i = s + 1;
      while (i < e) {
        let j = i;
        while (j < e && !isP(toks[j], ',')) j = match[j] > j && match[j] < e ? match[j] + 1 : j + 1;
        let d = i;
        while (d < j && !isP(toks[d], '=')) d = match[d] > d && match[d] < j ? match[d] + 1 : d + 1;
        patternNames(toks, match, i, d, hoist);
        if (d === j && a.v !== 'var') parts.push(toks[j - 1].e);
        i = j + 1;
      }
      edits.push([a.s, a.e - a.s, 'void (']);
      for (const pos of parts) edits.push([pos, 0, ' = undefined']);
      edits.push([toks[e - 1].e, 0, ')']);
      continue;
    }
    if (isStaticImport(toks, s)) {
      const repl = rewriteImport(toks, match, s, e, hoist);
      if (repl !== null) edits.push([a.s, toks[e0 - 1].e - a.s, repl]);
      continue;
    }
    if (isId(a, 'class') && isId(toks[s + 1])) {
      const name = toks[s + 1].v;
      let b = s + 2;
      while (b < e && !isP(toks[b], '{')) b = match[b] > b ? match[b] + 1 : b + 1;
      const end = match[b] > b ? toks[match[b]].e : toks[e - 1].e;
      if (isAsync) { hoist.push(name); edits.push([a.s, 0, `${name} = `]); } else edits.push([a.s, 0, `var ${name} = `]);
      edits.push([end, 0, ';']);
      continue;
    }
    const fnAt = isId(a, 'function') ? s : (isId(a, 'async') && isId(toks[s + 1], 'function') ? s + 1 : -1);
    if (isAsync && fnAt >= 0) {
      const nm = isP(toks[fnAt + 1], '*') ? toks[fnAt + 2] : toks[fnAt + 1];
      if (isId(nm)) { hoist.push(nm.v); edits.push([a.s, 0, `this.${nm.v} = ${nm.v}; `]); }
      continue;
    }
    if (isAsync && k === stmts.length - 1 && isExpressionStatement(toks, s)) {
      edits.push([a.s, 0, 'return {value: (']);
      edits.push([toks[e - 1].e, 0, '\n)}']);
    }
  }
  edits.sort((x, y) => x[0] - y[0]);
  let out = '';
  let pos = 0;
  for (const [p, del, ins] of edits) {
    out += src.slice(pos, p) + ins;
    pos = p + del;
  }
  out += src.slice(pos);
  if (!isAsync) {
    // `{a: 1}` alone is an object, as in the node REPL, not a block.
    if (toks.length && isP(toks[0], '{') && match[0] === toks.length - 1) {
      const asExpr = `(${src}\n)`;
      try { new vm.Script(asExpr); return { code: asExpr, isAsync }; } catch (e) { /* a block */ }
    }
    return { code: out, isAsync };
  }
  const decl = hoist.length ? `var ${[...new Set(hoist)].join(', ')}; ` : '';
  // One line of prefix, so line numbers in stack traces match the cell.
  return { code: `${decl}(async () => {${out}\n})()`, isAsync };
}

// -------------------------------------------------------------- execution
let transpile = null;
if (mode === 'typescript' && !strippedByAgent) {
  if (isBun) {
    const t = new Bun.Transpiler({ loader: 'ts', trimUnusedImports: false, deadCodeElimination: false });
    transpile = (code) => {
      try {
        return t.transformSync(code);
      } catch (e) {
        // bun reports a BuildMessage (with the position); it is a syntax error of the cell.
        const pos = e && e.position;
        const err = new SyntaxError(String((e && e.message) || e));
        err.stack = pos ? `cell:${pos.line}:${pos.column}\n${pos.lineText}\n${' '.repeat(Math.max(0, pos.column - 1))}^\n` +
          `SyntaxError: ${err.message}` : `SyntaxError: ${err.message}`;
        err.fromTranspiler = true;
        throw err;
      }
    };
  } else if (typeof Module.stripTypeScriptTypes === 'function') {
    transpile = (code) => Module.stripTypeScriptTypes(code, { mode: 'transform' });
  } else {
    send({ ev: 'fatal', message: `TypeScript needs its types stripped by the agent (mode "typescript stripped"), bun, or node >= 22.13; this is node ${proc.versions.node}` });
    proc.exit(1);
  }
}

const scripts = []; // kept alive: a collected script loses its importModuleDynamically callback
let count = 0;
let interruptPending = null; // rejects the awaited promise of an async cell on SIGINT

// import() in cells: the runtime's own loader (relative to the cwd) where vm
// offers it; node 20 refuses a custom callback without
// --experimental-vm-modules, so older runtimes get `import(` rewritten to
// importFromCell instead.
const MAIN_LOADER = vm.constants && vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;
globalThis.__execbox_import = importFromCell;
if (MAIN_LOADER) {
  // Its ExperimentalWarning would land in the first importing cell's stderr.
  const emitWarning = proc.emitWarning;
  proc.emitWarning = function (w, ...rest) {
    if (String((w && w.message) || w).includes('USE_MAIN_CONTEXT_DEFAULT_LOADER')) return undefined;
    return emitWarning.call(this, w, ...rest);
  };
}

function compile(code, filename) {
  const script = new vm.Script(code, { filename, importModuleDynamically: MAIN_LOADER || importFromCell });
  if (!MAIN_LOADER) scripts.push(script);
  return script;
}

class Interrupted extends _Error {
  constructor() { super('Execution interrupted by SIGINT'); this.name = 'Interrupted'; }
}

function errorEvent(err, src, filename) {
  if (err && err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED') err = new Interrupted();
  if (err instanceof _Error || util.types.isNativeError(err)) {
    const ename = String(err.name || (err.constructor && err.constructor.name) || 'Error');
    const evalue = String(err.message === undefined ? '' : err.message);
    let traceback;
    if (err.fromTranspiler) {
      traceback = err.stack.split('\n').map((l) => l.replace(/^cell:/, `${filename}:`));
    } else if (ename === 'SyntaxError' && typeof err.stack === 'string' && err.stack.startsWith(filename + ':')) {
      // Compile error: show the cell's own line (node decorates the stack
      // with the rewritten source).
      const line = parseInt(err.stack.slice(filename.length + 1), 10);
      const lines = src.trimEnd().split('\n');
      if (line > lines.length) {
        // Reported in the async wrapper's closing line: the cell itself is unfinished.
        const msg = 'Unexpected end of input';
        return { ev: 'error', ename, evalue: msg, traceback: [`${filename}:${lines.length}`, lines[lines.length - 1], `${ename}: ${msg}`] };
      }
      traceback = [`${filename}:${line}`, lines[line - 1], `${ename}: ${evalue}`];
    } else {
      const stack = typeof err.stack === 'string' ? err.stack.split('\n') : [`${ename}: ${evalue}`];
      // Frames of the kernel and of vm are noise to the user.
      traceback = stack.filter((l) => !(/^\s+at /.test(l) && (l.includes(KERNEL_FILE) || /\bnode:/.test(l) ||
        l.includes('runInThisContext'))));
      if (!traceback.length) traceback = [`${ename}: ${evalue}`];
    }
    return { ev: 'error', ename, evalue, traceback };
  }
  let shown;
  try { shown = inspect(err); } catch (e) { shown = String(err); }
  return { ev: 'error', ename: 'Error', evalue: shown, traceback: [`Uncaught ${shown}`] };
}

async function execute(code) {
  const n = ++count;
  const filename = `cell[${n}]`;
  let ok = true;
  let src = code;
  try {
    if (transpile) src = transpile(code);
    let { code: js, isAsync } = rewrite(src, false);
    let script;
    try {
      script = compile(js, filename);
    } catch (e) {
      // The rewrite can only be wrong on unusual syntax; if the plain cell
      // compiles, run it unchanged rather than fail.
      if (isAsync) throw e;
      script = compile(src, filename);
    }
    let value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    if (isAsync) {
      value = await new _Promise((resolve, reject) => {
        interruptPending = reject;
        value.then(resolve, reject);
      }).finally(() => { interruptPending = null; });
      value = value ? value.value : undefined;
    }
    if (value !== undefined) send({ ev: 'result', execution_count: n, data: { 'text/plain': inspect(value) } });
  } catch (err) {
    ok = false;
    send(errorEvent(err, src, filename));
  }
  send({ ev: 'done', execution_count: n, ok });
}

// A cell the agent could not compile (a TypeScript syntax error): an execution
// of its own that ends with that error, so the counter stays the kernel's.
function failed(error) {
  const n = ++count;
  const traceback = Array.isArray(error.traceback) ? error.traceback.map(String) : [];
  send({ ev: 'error', ename: String(error.ename || 'SyntaxError'), evalue: String(error.evalue || ''), traceback });
  send({ ev: 'done', execution_count: n, ok: false });
}

proc.on('SIGINT', () => {
  // Idle or between statements: harmless. Awaiting: abandon the cell.
  if (interruptPending) { const r = interruptPending; interruptPending = null; r(new Interrupted()); }
});
// Errors from timers and stray promises after their cell ended must not kill
// the kernel: report them on stderr.
proc.on('uncaughtException', (err) => { stderr.write(`Uncaught ${inspect(err)}\n`); });
proc.on('unhandledRejection', (err) => { stderr.write(`Unhandled promise rejection: ${inspect(err)}\n`); });

// ------------------------------------------------------------ control loop
const queue = [];
let busy = false;
async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length) {
    const line = queue.shift();
    let msg;
    try { msg = _JSON.parse(line); } catch (e) { stderr.write(`kernel: bad control message: ${line}\n`); continue; }
    if (msg && msg.op === 'execute') {
      // Leap0's env_vars: set for this execution and the ones after it.
      if (msg.env && typeof msg.env === 'object') {
        for (const [k, v] of Object.entries(msg.env)) process.env[k] = String(v);
      }
      if (msg.error && typeof msg.error === 'object') failed(msg.error);
      else await execute(String(msg.code ?? ''));
    }
    else stderr.write(`kernel: unknown op: ${line}\n`);
  }
  busy = false;
}

let pending = _Buffer.alloc(0);
function onData(chunk) {
  pending = pending.length ? _Buffer.concat([pending, chunk]) : _Buffer.from(chunk);
  let nlAt;
  while ((nlAt = pending.indexOf(10)) >= 0) {
    const line = pending.subarray(0, nlAt).toString('utf8').trim();
    pending = pending.subarray(nlAt + 1);
    if (line) queue.push(line);
  }
  pump();
}
function onEnd() { proc.exit(0); } // the agent closed the channel

if (isBun) {
  // bun's net.Socket cannot adopt an fd; Bun.file(fd).stream() reads it.
  (async () => {
    try {
      const reader = Bun.file(CTRL_FD).stream().getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        onData(_Buffer.from(value));
      }
    } catch (e) { /* treated as EOF */ }
    onEnd();
  })();
} else {
  const net = require('net');
  let sock;
  try {
    sock = new net.Socket({ fd: CTRL_FD, readable: true, writable: true });
  } catch (e) {
    stderr.write(`kernel: fd ${CTRL_FD} must be the control socket: ${e.message}\n`);
    proc.exit(2);
  }
  sock.on('data', onData);
  sock.on('end', onEnd);
  sock.on('error', onEnd);
}

send({ ev: 'ready', language: mode, version: isBun ? Bun.version : proc.versions.node });
