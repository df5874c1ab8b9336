// execbox REPL kernel for Go. The agent builds this file inside the sandbox, as the sandbox
// user (`go build`, offline: GOPROXY=off, GOTOOLCHAIN=local), and runs it with one argument, a
// private work directory it removes at exit.
//
// fd 3 is the control channel, newline-delimited JSON:
//
//	kernel -> agent: {"ev":"ready",...} once, then per execute: error?, and always
//	                 {"ev":"done","execution_count":N,"ok":bool}
//	agent -> kernel: {"op":"execute","code":"...","env":{...}?}
//
// Go has no interpreter, so each cell is compiled into a program and run. What a context keeps
// between cells (gophernotes-like; upstream's GoNB keeps declarations the same way, but
// re-evaluates its variables' initializers in every cell, which this kernel never does):
//
//   - Declarations at the top level of a cell (imports, types, functions, methods, constants)
//     are kept and are part of every later program; a later declaration of the same name
//     replaces the earlier one. `func main` and `func init` in a cell are not kept: they run
//     once, where they stand in the cell.
//   - Everything else at the top level is a statement and runs once, in the cell that holds it:
//     output is never printed again and no side effect is replayed.
//   - Variables declared at the top level of a cell (`x := …`, `var x = …`) become package-level
//     variables (their types found by go/types), so functions see them, and they stay visible
//     to later cells. Their *values* are carried from one program to the next: each program
//     writes the values of all kept variables when its statements end (also when they panic)
//     and the next one reads them back before its statements run. Booleans, numbers, strings,
//     arrays, slices, maps, structs (unexported fields included), pointers (sharing and cycles
//     kept) and interfaces holding such values of known types are carried; a value that cannot
//     be (a non-nil func or channel, …) is replaced by its type's zero value, with a note on
//     stderr. Nothing outside the program (files, processes, goroutines, open descriptors)
//     lives on between cells.
//   - A cell that does not compile changes nothing. A cell that compiles keeps its
//     declarations even when it then fails at run time; its variables keep the values they had
//     when it ended or panicked, or, when the program was killed (interrupt, timeout, os.Exit),
//     the values from before the cell (new ones start at zero).
//
// Errors are reported the way upstream's Go kernel (GoNB) names them: ename "ERROR". The
// compiler's messages name cells as `cell[N]:line:col`.
//
// SIGINT (the agent's interrupt) stops the build or the program of the running cell; it is
// ignored while idle. EOF on fd 3 ends the kernel.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/importer"
	"go/parser"
	"go/scanner"
	"go/token"
	"go/types"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

const ctlFD = 3

// An import kept by the context.
type importSpec struct {
	name string // explicit name ("", ".", "_" or an identifier)
	path string
}

// A kept declaration or variable, by name.
type entry struct {
	isVar bool
	src   string // declaration: its source, preceded by a //line directive
	typ   string // variable: its type's source
	// variable: packages its type names, alias -> path
	typeImports map[string]string
	seq         int
}

type kernel struct {
	dir       string
	ctl       *os.File
	imports   map[string]importSpec // key: name + " " + path
	names     map[string]*entry
	seq       int
	count     int
	mu        sync.Mutex
	busy      bool // a cell is being compiled or run
	running   *exec.Cmd
	interrupt bool
}

var errInterrupted = errors.New("interrupted")

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go_kernel <work directory>")
		os.Exit(2)
	}
	// The binary is not needed on disk once it runs.
	_ = os.Remove(os.Args[0])
	k := &kernel{
		dir:     os.Args[1],
		ctl:     os.NewFile(ctlFD, "ctl"),
		imports: map[string]importSpec{},
		names:   map[string]*entry{},
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt)
	go func() {
		for range sigs {
			k.mu.Lock()
			if k.busy {
				k.interrupt = true
				if k.running != nil {
					_ = k.running.Process.Kill()
				}
			}
			k.mu.Unlock()
		}
	}()
	// The first build fills the build cache with what every program links (the state helper's
	// packages), so that the first cell is not the slow one.
	if msg, err := k.build("package main\n\nfunc main() { _execboxRestore(); _execboxSave() }\n\nconst _execboxStatePath = \"\"\n\nvar _execboxVars []_execboxVar\n"); err != nil {
		k.send(map[string]any{"ev": "fatal", "message": "the Go toolchain cannot build programs: " + msg})
		os.Exit(1)
	}
	k.send(map[string]any{"ev": "ready", "language": "go", "version": strings.TrimPrefix(runtime.Version(), "go")})

	in := bufio.NewReaderSize(k.ctl, 1<<20)
	for {
		line, err := in.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var msg struct {
				Op   string            `json:"op"`
				Code string            `json:"code"`
				Env  map[string]string `json:"env"`
			}
			if json.Unmarshal(line, &msg) != nil || msg.Op != "execute" {
				fmt.Fprintf(os.Stderr, "kernel: bad control message: %s", line)
			} else {
				k.count++
				k.execute(msg.Code, msg.Env)
			}
		}
		if err != nil {
			break
		}
	}
	_ = os.RemoveAll(k.dir)
}

func (k *kernel) send(msg map[string]any) {
	os.Stdout.Sync()
	os.Stderr.Sync()
	b, err := json.Marshal(msg)
	if err != nil {
		return
	}
	if _, err := k.ctl.Write(append(b, '\n')); err != nil {
		os.Exit(0) // the agent is gone
	}
}

func (k *kernel) fail(evalue string, traceback []string) {
	if traceback == nil {
		traceback = []string{evalue}
	}
	k.send(map[string]any{"ev": "error", "ename": "ERROR", "evalue": evalue, "traceback": traceback})
}

// ------------------------------------------------------------------ cells

// A top-level piece of a cell: one declaration or one statement.
type segment struct {
	text      string
	line, col int // where it starts in the cell (1-based)
}

// split cuts a cell at the semicolons (explicit or automatic) that are outside any bracket:
// each piece is one top-level declaration or statement.
func split(src string) []segment {
	fset := token.NewFileSet()
	file := fset.AddFile("cell", -1, len(src))
	var s scanner.Scanner
	s.Init(file, []byte(src), func(token.Position, string) {}, 0)
	var out []segment
	depth, start := 0, -1
	var startPos token.Pos
	flush := func(end int) {
		if start >= 0 && end > start {
			p := fset.Position(startPos)
			out = append(out, segment{text: src[start:end], line: p.Line, col: p.Column})
		}
		start = -1
	}
	for {
		pos, tok, _ := s.Scan()
		if tok == token.EOF {
			flush(len(src))
			return out
		}
		off := file.Offset(pos)
		if tok == token.SEMICOLON && depth == 0 {
			flush(off)
			continue
		}
		if start < 0 {
			start, startPos = off, pos
		}
		switch tok {
		case token.LPAREN, token.LBRACK, token.LBRACE:
			depth++
		case token.RPAREN, token.RBRACK, token.RBRACE:
			if depth > 0 {
				depth--
			}
		}
	}
}

// firstTokens returns the first two tokens of a segment.
func firstTokens(src string) (token.Token, token.Token) {
	fset := token.NewFileSet()
	file := fset.AddFile("seg", -1, len(src))
	var s scanner.Scanner
	s.Init(file, []byte(src), func(token.Position, string) {}, 0)
	_, a, _ := s.Scan()
	_, b, _ := s.Scan()
	return a, b
}

func lineDirective(cell, line, col int) string {
	return fmt.Sprintf("//line cell[%d]:%d:%d\n", cell, line, col)
}

// A declaration of this cell: its names (nil when it does not parse: it is compiled all the
// same, to get the compiler's error, and never kept).
type cellDecl struct {
	names []string
	src   string
}

// A statement of this cell.
type cellStmt struct {
	seg segment
	src string // with the line directive
}

func parseDecl(text string) (*ast.File, *token.FileSet, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "decl.go", "package main\n"+text, parser.SkipObjectResolution)
	return f, fset, err
}

func recvName(e ast.Expr) string {
	for {
		switch t := e.(type) {
		case *ast.StarExpr:
			e = t.X
		case *ast.IndexExpr:
			e = t.X
		case *ast.IndexListExpr:
			e = t.X
		case *ast.ParenExpr:
			e = t.X
		case *ast.Ident:
			return t.Name
		default:
			return "?"
		}
	}
}

func (k *kernel) execute(code string, env map[string]string) {
	k.mu.Lock()
	k.busy, k.interrupt = true, false
	k.mu.Unlock()
	ok := k.run(code, env)
	k.mu.Lock()
	k.busy = false
	k.mu.Unlock()
	k.send(map[string]any{"ev": "done", "execution_count": k.count, "ok": ok})
}

// run compiles and runs one cell; false when it failed (the error is sent).
func (k *kernel) run(code string, env map[string]string) bool {
	cell := k.count
	var decls []cellDecl
	var stmts []cellStmt
	newImports := map[string]importSpec{}
	special := 0
	for _, seg := range split(code) {
		a, b := firstTokens(seg.text)
		isDecl := a == token.IMPORT || a == token.TYPE || a == token.CONST ||
			(a == token.FUNC && (b == token.IDENT || b == token.LPAREN))
		if !isDecl {
			stmts = append(stmts, cellStmt{seg: seg})
			continue
		}
		f, _, err := parseDecl(seg.text)
		if err != nil || len(f.Decls) != 1 {
			if a == token.FUNC && b == token.LPAREN {
				// A function literal called at once, not a method.
				stmts = append(stmts, cellStmt{seg: seg})
				continue
			}
			decls = append(decls, cellDecl{src: lineDirective(cell, seg.line, seg.col) + seg.text})
			continue
		}
		text := seg.text
		var names []string
		switch d := f.Decls[0].(type) {
		case *ast.GenDecl:
			for _, sp := range d.Specs {
				switch s := sp.(type) {
				case *ast.ImportSpec:
					p, _ := strconv.Unquote(s.Path.Value)
					name := ""
					if s.Name != nil {
						name = s.Name.Name
					}
					newImports[name+" "+p] = importSpec{name: name, path: p}
				case *ast.TypeSpec:
					names = append(names, s.Name.Name)
				case *ast.ValueSpec:
					for _, n := range s.Names {
						names = append(names, n.Name)
					}
				}
			}
			if d.Tok == token.IMPORT {
				continue
			}
		case *ast.FuncDecl:
			if d.Recv != nil && len(d.Recv.List) > 0 {
				names = []string{recvName(d.Recv.List[0].Type) + "." + d.Name.Name}
			} else if d.Name.Name == "main" || d.Name.Name == "init" {
				// Runs once, here in the cell: renamed and called in place.
				special++
				renamed := fmt.Sprintf("_execboxCell%s%d", d.Name.Name, special)
				off := int(d.Name.Pos()) - 1 - len("package main\n")
				text = text[:off] + renamed + text[off+len(d.Name.Name):]
				decls = append(decls, cellDecl{src: lineDirective(cell, seg.line, seg.col) + text})
				stmts = append(stmts, cellStmt{seg: segment{text: renamed + "()", line: seg.line, col: seg.col}})
				continue
			} else {
				names = []string{d.Name.Name}
			}
		}
		decls = append(decls, cellDecl{names: names, src: lineDirective(cell, seg.line, seg.col) + text})
	}

	// The names this cell declares replace the kept ones.
	replaced := map[string]bool{}
	for _, d := range decls {
		for _, n := range d.names {
			replaced[n] = true
		}
	}
	imports := map[string]importSpec{}
	for key, im := range k.imports {
		imports[key] = im
	}
	for key, im := range newImports {
		imports[key] = im
	}

	// Which top-level statements declare variables, and of which types (go/types on the
	// program as written, variables still local to main).
	vars, rewrites := k.findVars(cell, imports, decls, stmts, replaced)
	for name := range vars {
		replaced[name] = true
	}

	// The program.
	var src strings.Builder
	src.WriteString("package main\n\n")
	var keptDecls []*entry
	var keptVars []string
	for name, e := range k.names {
		if replaced[name] {
			continue
		}
		if e.isVar {
			keptVars = append(keptVars, name)
		} else {
			keptDecls = append(keptDecls, e)
		}
	}
	sort.Slice(keptDecls, func(i, j int) bool { return keptDecls[i].seq < keptDecls[j].seq })
	sort.Strings(keptVars)
	var body strings.Builder
	emitted := map[string]bool{}
	for _, e := range keptDecls {
		// A grouped declaration (`type ( A int; B string )`) is one entry per name.
		if !emitted[e.src] {
			emitted[e.src] = true
			body.WriteString(e.src)
			body.WriteString("\n\n")
		}
	}
	for _, d := range decls {
		body.WriteString(d.src)
		body.WriteString("\n\n")
	}
	varTypes := map[string]*entry{}
	for _, n := range keptVars {
		varTypes[n] = k.names[n]
	}
	for n, e := range vars {
		varTypes[n] = e
	}
	var allVars []string
	for n := range varTypes {
		allVars = append(allVars, n)
	}
	sort.Strings(allVars)
	typeImports := map[string]string{}
	body.WriteString("//line execbox:1\n")
	for _, n := range allVars {
		fmt.Fprintf(&body, "var %s %s\n", n, varTypes[n].typ)
		for alias, p := range varTypes[n].typeImports {
			typeImports[alias] = p
		}
	}
	body.WriteString("\nvar _execboxVars = []_execboxVar{")
	for _, n := range allVars {
		fmt.Fprintf(&body, "{%q, &%s}, ", n, n)
	}
	body.WriteString("}\n\nfunc init() {\n")
	for _, n := range typeNames(keptDecls, decls) {
		fmt.Fprintf(&body, "\t_execboxRegister[%s]()\n", n)
	}
	fmt.Fprintf(&body, "}\n\nconst _execboxStatePath = %q\n\nfunc main() {\n\tdefer _execboxSave()\n\t_execboxRestore()\n", filepath.Join(k.dir, "state"))
	for i, s := range stmts {
		text := s.seg.text
		if r, ok := rewrites[i]; ok {
			text = r
		}
		body.WriteString(lineDirective(cell, s.seg.line, s.seg.col))
		body.WriteString(text)
		body.WriteString("\n")
	}
	body.WriteString("//line execbox:2\n}\n")

	// Only the imports the program uses: Go refuses unused ones.
	used := usedPackages(body.String())
	var importLines []string
	for _, im := range imports {
		name := im.name
		if name == "" {
			name = defaultName(im.path)
		}
		if name == "_" || name == "." || used[name] {
			importLines = append(importLines, fmt.Sprintf("import %s %q", im.name, im.path))
		}
	}
	for alias, p := range typeImports {
		importLines = append(importLines, fmt.Sprintf("import %s %q", alias, p))
	}
	sort.Strings(importLines)
	for _, l := range importLines {
		src.WriteString(l + "\n")
	}
	src.WriteString("\n")
	src.WriteString(body.String())

	if msg, err := k.build(src.String()); err != nil {
		if k.takeInterrupt() || interruptedBy(err) {
			k.fail("interrupted", nil)
			return false
		}
		lines := strings.Split(strings.TrimRight(msg, "\n"), "\n")
		k.fail(strings.Join(lines, "\n"), lines)
		return false
	}

	// It compiles: the declarations are kept.
	for key, im := range newImports {
		k.imports[key] = im
	}
	for _, d := range decls {
		for _, n := range d.names {
			k.seq++
			k.names[n] = &entry{src: d.src, seq: k.seq}
		}
	}
	for n, e := range vars {
		k.seq++
		e.seq = k.seq
		k.names[n] = e
	}
	return k.runProgram(env)
}

// typeNames lists the kept and new type declarations whose values an interface may hold
// (generic types cannot be named without their arguments).
func typeNames(kept []*entry, decls []cellDecl) []string {
	var srcs []string
	for _, e := range kept {
		srcs = append(srcs, e.src)
	}
	for _, d := range decls {
		if d.names != nil {
			srcs = append(srcs, d.src)
		}
	}
	seen := map[string]bool{}
	var out []string
	for _, s := range srcs {
		f, _, err := parseDecl(s)
		if err != nil {
			continue
		}
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.TYPE {
				continue
			}
			for _, sp := range g.Specs {
				ts := sp.(*ast.TypeSpec)
				if ts.TypeParams == nil && !seen[ts.Name.Name] {
					seen[ts.Name.Name] = true
					out = append(out, ts.Name.Name)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

var versionSuffix = regexp.MustCompile(`^v[0-9]+$`)

// defaultName is the name a package is imported under without an explicit one (the last
// element of its path, for the standard library).
func defaultName(path string) string {
	parts := strings.Split(path, "/")
	name := parts[len(parts)-1]
	if versionSuffix.MatchString(name) && len(parts) > 1 {
		name = parts[len(parts)-2]
	}
	return strings.TrimPrefix(name, "go-")
}

// usedPackages lists the identifiers used as `X` in `X.Sel` in a program body.
func usedPackages(body string) map[string]bool {
	used := map[string]bool{}
	f, err := parser.ParseFile(token.NewFileSet(), "p.go", "package main\n"+body, parser.SkipObjectResolution)
	if f == nil {
		return used
	}
	_ = err // a partial tree is enough; the compiler reports the errors
	ast.Inspect(f, func(n ast.Node) bool {
		if s, ok := n.(*ast.SelectorExpr); ok {
			if id, ok := s.X.(*ast.Ident); ok {
				used[id.Name] = true
			}
		}
		return true
	})
	return used
}

// findVars type-checks the cell's statements as the body of main and returns the variables its
// top-level statements declare (with their types) and those statements rewritten as
// assignments to package-level variables. A statement whose types are unknown (the cell has an
// error) is left as it is: the compiler then reports the error.
func (k *kernel) findVars(cell int, imports map[string]importSpec, decls []cellDecl, stmts []cellStmt, replaced map[string]bool) (map[string]*entry, map[int]string) {
	vars := map[string]*entry{}
	rewrites := map[int]string{}
	// Imports first, then declarations: Go wants them in that order.
	var head, decl strings.Builder
	head.WriteString("package main\n\n")
	emitted := map[string]bool{}
	for _, im := range imports {
		fmt.Fprintf(&head, "import %s %q\n", im.name, im.path)
	}
	var keptVars []string
	for name, e := range k.names {
		if replaced[name] {
			continue
		}
		if e.isVar {
			keptVars = append(keptVars, name)
			for alias, p := range e.typeImports {
				line := fmt.Sprintf("import %s %q\n", alias, p)
				if !emitted[line] {
					emitted[line] = true
					head.WriteString(line)
				}
			}
		} else if !emitted[e.src] {
			emitted[e.src] = true
			decl.WriteString(e.src + "\n\n")
		}
	}
	for _, d := range decls {
		decl.WriteString(d.src + "\n\n")
	}
	for _, n := range keptVars {
		fmt.Fprintf(&decl, "var %s %s\n", n, k.names[n].typ)
	}
	var src strings.Builder
	src.WriteString(head.String())
	src.WriteString("\n")
	src.WriteString(decl.String())
	src.WriteString("func main() {\n")
	starts := make([]int, len(stmts))
	for i, s := range stmts {
		starts[i] = src.Len()
		src.WriteString(s.seg.text)
		src.WriteString(";\n")
	}
	src.WriteString("}\n")
	text := src.String()

	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "probe.go", text, parser.SkipObjectResolution)
	if err != nil || f == nil {
		return vars, rewrites
	}
	var mainBody *ast.BlockStmt
	for _, d := range f.Decls {
		if fd, ok := d.(*ast.FuncDecl); ok && fd.Recv == nil && fd.Name.Name == "main" {
			mainBody = fd.Body
		}
	}
	if mainBody == nil {
		return vars, rewrites
	}
	info := &types.Info{Defs: map[*ast.Ident]types.Object{}}
	conf := types.Config{Importer: importer.Default(), Error: func(error) {}}
	_, _ = conf.Check("main", fset, []*ast.File{f}, info)

	segOf := func(pos token.Pos) (int, int) {
		off := fset.Position(pos).Offset
		for i := len(starts) - 1; i >= 0; i-- {
			if off >= starts[i] {
				return i, off - starts[i]
			}
		}
		return -1, 0
	}
	srcOf := func(a, b token.Pos) string {
		return text[fset.Position(a).Offset:fset.Position(b).Offset]
	}
	newVar := func(id *ast.Ident) (*entry, bool) {
		if id.Name == "_" {
			return nil, true
		}
		obj, ok := info.Defs[id].(*types.Var)
		if !ok || obj == nil {
			return nil, true // not new here
		}
		typ, imps, ok := typeSource(obj.Type())
		if !ok {
			return nil, false
		}
		return &entry{isVar: true, typ: typ, typeImports: imps}, true
	}
	for _, st := range mainBody.List {
		switch s := st.(type) {
		case *ast.AssignStmt:
			if s.Tok != token.DEFINE {
				continue
			}
			found := map[string]*entry{}
			good := true
			for _, l := range s.Lhs {
				id, ok := l.(*ast.Ident)
				if !ok {
					good = false
					break
				}
				e, ok := newVar(id)
				if !ok {
					good = false
					break
				}
				if e != nil {
					found[id.Name] = e
				}
			}
			i, off := segOf(s.TokPos)
			if !good || i < 0 {
				continue
			}
			seg := stmts[i].seg.text
			rewrites[i] = seg[:off] + "=" + seg[off+2:]
			for n, e := range found {
				vars[n] = e
			}
		case *ast.DeclStmt:
			g, ok := s.Decl.(*ast.GenDecl)
			if !ok || g.Tok != token.VAR {
				continue
			}
			i, _ := segOf(g.Pos())
			if i < 0 {
				continue
			}
			found := map[string]*entry{}
			var parts []string
			good := true
			for _, sp := range g.Specs {
				vs := sp.(*ast.ValueSpec)
				var names []string
				for _, id := range vs.Names {
					e, ok := newVar(id)
					if !ok {
						good = false
						break
					}
					if e != nil {
						found[id.Name] = e
					}
					names = append(names, id.Name)
				}
				if !good {
					break
				}
				if len(vs.Values) > 0 {
					parts = append(parts, strings.Join(names, ", ")+" = "+srcOf(vs.Values[0].Pos(), vs.Values[len(vs.Values)-1].End()))
				} else {
					for _, n := range names {
						if n != "_" {
							parts = append(parts, fmt.Sprintf("%s = *new(%s)", n, found[n].typ))
						}
					}
				}
			}
			if !good {
				continue
			}
			if len(parts) == 0 {
				parts = []string{"{}"}
			}
			// As many lines as the declaration had, so later lines keep their numbers.
			lines := strings.Count(stmts[i].seg.text, "\n")
			rewrites[i] = strings.Join(parts, "; ") + strings.Repeat("\n", lines)
			for n, e := range found {
				vars[n] = e
			}
		}
	}
	return vars, rewrites
}

// typeSource writes a type as source for the generated program, naming other packages through
// aliases (`_execbox_<path>`) so that they never clash with the user's names; false when the
// type cannot be named outside its package.
func typeSource(t types.Type) (string, map[string]string, bool) {
	imps := map[string]string{}
	ok := true
	var check func(t types.Type, depth int)
	check = func(t types.Type, depth int) {
		if depth > 20 {
			return
		}
		switch u := t.(type) {
		case *types.Named:
			obj := u.Obj()
			if obj.Pkg() != nil && obj.Pkg().Path() != "main" && !obj.Exported() {
				ok = false
			}
			if obj.Pkg() != nil && obj.Parent() != nil && obj.Parent() != obj.Pkg().Scope() {
				ok = false // declared inside a function
			}
			if ta := u.TypeArgs(); ta != nil {
				for i := 0; i < ta.Len(); i++ {
					check(ta.At(i), depth+1)
				}
			}
		case *types.Pointer:
			check(u.Elem(), depth+1)
		case *types.Slice:
			check(u.Elem(), depth+1)
		case *types.Array:
			check(u.Elem(), depth+1)
		case *types.Map:
			check(u.Key(), depth+1)
			check(u.Elem(), depth+1)
		case *types.Chan:
			check(u.Elem(), depth+1)
		case *types.Signature:
			for i := 0; i < u.Params().Len(); i++ {
				check(u.Params().At(i).Type(), depth+1)
			}
			for i := 0; i < u.Results().Len(); i++ {
				check(u.Results().At(i).Type(), depth+1)
			}
		case *types.Struct:
			for i := 0; i < u.NumFields(); i++ {
				f := u.Field(i)
				if !f.Exported() && f.Pkg() != nil && f.Pkg().Path() != "main" {
					ok = false
				}
				check(f.Type(), depth+1)
			}
		case *types.Basic:
			if u.Info()&types.IsUntyped != 0 || u.Kind() == types.Invalid {
				ok = false
			}
		case *types.Tuple:
			ok = false
		}
	}
	check(t, 0)
	if !ok {
		return "", nil, false
	}
	s := types.TypeString(t, func(p *types.Package) string {
		if p.Path() == "main" {
			return ""
		}
		alias := "_execbox_" + strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
				return r
			}
			return '_'
		}, p.Path())
		imps[alias] = p.Path()
		return alias
	})
	return s, imps, true
}

// ------------------------------------------------------------------ build and run

// interruptedBy tells whether a build or program ended by SIGINT: the agent's interrupt goes
// to the whole process group, so the child may die of it before this kernel's own handler
// has marked the cell interrupted.
func interruptedBy(err error) bool {
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		return false
	}
	ws, ok := exit.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGINT
}

func (k *kernel) takeInterrupt() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	was := k.interrupt
	k.interrupt = false
	return was
}

// build writes a program and compiles it to <dir>/prog; the compiler's messages on failure.
func (k *kernel) build(program string) (string, error) {
	if err := os.WriteFile(filepath.Join(k.dir, "cell.go"), []byte(program), 0o600); err != nil {
		return err.Error(), err
	}
	if err := os.WriteFile(filepath.Join(k.dir, "zz_execbox_state.go"), []byte(stateHelper), 0o600); err != nil {
		return err.Error(), err
	}
	cmd := exec.Command("go", "build", "-o", "prog", "cell.go", "zz_execbox_state.go")
	cmd.Dir = k.dir
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := k.start(cmd); err != nil {
		return err.Error(), err
	}
	err := k.wait(cmd)
	if err == nil {
		return "", nil
	}
	var lines []string
	for _, l := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(l, "# ") || strings.TrimSpace(l) == "" {
			continue
		}
		lines = append(lines, strings.TrimPrefix(l, "./"))
	}
	if len(lines) == 0 {
		lines = []string{err.Error()}
	}
	return strings.Join(lines, "\n"), err
}

func (k *kernel) start(cmd *exec.Cmd) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.interrupt {
		return errInterrupted
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	k.running = cmd
	return nil
}

func (k *kernel) wait(cmd *exec.Cmd) error {
	err := cmd.Wait()
	k.mu.Lock()
	k.running = nil
	k.mu.Unlock()
	return err
}

// tail keeps the last bytes written to it, passing everything on.
type tail struct {
	w   io.Writer
	buf []byte
}

func (t *tail) Write(p []byte) (int, error) {
	t.buf = append(t.buf, p...)
	if len(t.buf) > 64<<10 {
		t.buf = t.buf[len(t.buf)-64<<10:]
	}
	return t.w.Write(p)
}

func (k *kernel) runProgram(env map[string]string) bool {
	prog := filepath.Join(k.dir, "prog")
	defer os.Remove(prog)
	cmd := exec.Command(prog)
	cmd.Args = []string{"main"}
	cmd.Stdout = os.Stdout
	stderr := &tail{w: os.Stderr}
	cmd.Stderr = stderr
	cmd.Env = os.Environ()
	keys := make([]string, 0, len(env))
	for key := range env {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	for _, key := range keys {
		cmd.Env = append(cmd.Env, key+"="+env[key])
	}
	if err := k.start(cmd); err != nil {
		k.takeInterrupt()
		k.fail(err.Error(), nil)
		return false
	}
	err := k.wait(cmd)
	if k.takeInterrupt() || interruptedBy(err) {
		k.fail("interrupted", nil)
		return false
	}
	if err == nil {
		return true
	}
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		k.fail(err.Error(), nil)
		return false
	}
	// A panic: its message is the error's value, the goroutine dump its traceback.
	text := string(stderr.buf)
	if i := strings.LastIndex(text, "panic: "); i >= 0 {
		trace := strings.Split(strings.TrimRight(text[i:], "\n"), "\n")
		k.fail(trace[0], trace)
		return false
	}
	if ws, ok := exit.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		k.fail("killed by signal "+ws.Signal().String(), nil)
		return false
	}
	k.fail(fmt.Sprintf("exit status %d", exit.ExitCode()), nil)
	return false
}

// stateHelper is compiled into every program: it carries the kept variables' values from one
// program to the next (see the comment at the top).
const stateHelper = `package main

import (
	"encoding/gob"
	"fmt"
	"os"
	"reflect"
	"unsafe"
)

type _execboxVar struct {
	name string
	ptr  interface{}
}

// One value: K is its kind (0 nil, 1 bool, 2 int, 3 uint, 4 float, 5 complex, 6 string,
// 7 array or slice, 8 map, 9 struct, 10 pointer, 11 interface).
type _execboxNode struct {
	K uint8
	B bool
	I int64
	U uint64
	F [2]float64
	S string
	E []_execboxNode
	N []string
	R int
	T string
}

var _execboxTypes = map[string]reflect.Type{}

func _execboxRegister[T any]() {
	t := reflect.TypeOf((*T)(nil)).Elem()
	for _, u := range []reflect.Type{t, reflect.PtrTo(t), reflect.SliceOf(t), reflect.MapOf(reflect.TypeOf(""), t)} {
		_execboxTypes[u.String()] = u
	}
}

func init() {
	_execboxRegister[bool]()
	_execboxRegister[string]()
	_execboxRegister[int]()
	_execboxRegister[int8]()
	_execboxRegister[int16]()
	_execboxRegister[int32]()
	_execboxRegister[int64]()
	_execboxRegister[uint]()
	_execboxRegister[uint8]()
	_execboxRegister[uint16]()
	_execboxRegister[uint32]()
	_execboxRegister[uint64]()
	_execboxRegister[uintptr]()
	_execboxRegister[float32]()
	_execboxRegister[float64]()
	_execboxRegister[complex64]()
	_execboxRegister[complex128]()
	_execboxRegister[interface{}]()
	_execboxRegister[[]interface{}]()
	_execboxRegister[map[string]interface{}]()
}

type _execboxPtrKey struct {
	p uintptr
	t reflect.Type
}

type _execboxEnc struct {
	ptrs map[_execboxPtrKey]int
}

func (e *_execboxEnc) enc(v reflect.Value, depth int) (_execboxNode, error) {
	if depth > 10000 {
		return _execboxNode{}, fmt.Errorf("nested too deeply")
	}
	switch v.Kind() {
	case reflect.Bool:
		return _execboxNode{K: 1, B: v.Bool()}, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return _execboxNode{K: 2, I: v.Int()}, nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return _execboxNode{K: 3, U: v.Uint()}, nil
	case reflect.Float32, reflect.Float64:
		return _execboxNode{K: 4, F: [2]float64{v.Float()}}, nil
	case reflect.Complex64, reflect.Complex128:
		c := v.Complex()
		return _execboxNode{K: 5, F: [2]float64{real(c), imag(c)}}, nil
	case reflect.String:
		return _execboxNode{K: 6, S: v.String()}, nil
	case reflect.Slice, reflect.Array:
		if v.Kind() == reflect.Slice && v.IsNil() {
			return _execboxNode{}, nil
		}
		n := _execboxNode{K: 7, E: make([]_execboxNode, v.Len())}
		for i := range n.E {
			x, err := e.enc(v.Index(i), depth+1)
			if err != nil {
				return n, err
			}
			n.E[i] = x
		}
		return n, nil
	case reflect.Map:
		if v.IsNil() {
			return _execboxNode{}, nil
		}
		n := _execboxNode{K: 8}
		it := v.MapRange()
		for it.Next() {
			key, err := e.enc(it.Key(), depth+1)
			if err != nil {
				return n, err
			}
			val, err := e.enc(it.Value(), depth+1)
			if err != nil {
				return n, err
			}
			n.E = append(n.E, key, val)
		}
		return n, nil
	case reflect.Struct:
		n := _execboxNode{K: 9}
		for i := 0; i < v.NumField(); i++ {
			x, err := e.enc(v.Field(i), depth+1)
			if err != nil {
				return n, err
			}
			n.N = append(n.N, v.Type().Field(i).Name)
			n.E = append(n.E, x)
		}
		return n, nil
	case reflect.Ptr:
		if v.IsNil() {
			return _execboxNode{}, nil
		}
		key := _execboxPtrKey{v.Pointer(), v.Type()}
		if id, ok := e.ptrs[key]; ok {
			return _execboxNode{K: 10, R: id}, nil
		}
		id := len(e.ptrs) + 1
		e.ptrs[key] = id
		x, err := e.enc(v.Elem(), depth+1)
		if err != nil {
			return x, err
		}
		return _execboxNode{K: 10, R: id, E: []_execboxNode{x}}, nil
	case reflect.Interface:
		if v.IsNil() {
			return _execboxNode{}, nil
		}
		d := v.Elem()
		name := d.Type().String()
		if _, ok := _execboxTypes[name]; !ok {
			return _execboxNode{}, fmt.Errorf("it holds a %s", name)
		}
		x, err := e.enc(d, depth+1)
		if err != nil {
			return x, err
		}
		return _execboxNode{K: 11, T: name, E: []_execboxNode{x}}, nil
	case reflect.Func, reflect.Chan, reflect.UnsafePointer:
		if v.IsNil() {
			return _execboxNode{}, nil
		}
	}
	return _execboxNode{}, fmt.Errorf("a %s cannot be carried to another program", v.Type())
}

type _execboxDec struct {
	ptrs map[int]reflect.Value
}

func _execboxSettable(v reflect.Value) reflect.Value {
	if v.CanSet() {
		return v
	}
	// An unexported field of a struct.
	return reflect.NewAt(v.Type(), unsafe.Pointer(v.UnsafeAddr())).Elem()
}

func (d *_execboxDec) dec(n _execboxNode, v reflect.Value) error {
	v = _execboxSettable(v)
	if n.K == 0 {
		v.Set(reflect.Zero(v.Type()))
		return nil
	}
	bad := fmt.Errorf("its type changed")
	switch v.Kind() {
	case reflect.Bool:
		if n.K != 1 {
			return bad
		}
		v.SetBool(n.B)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if n.K != 2 {
			return bad
		}
		v.SetInt(n.I)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		if n.K != 3 {
			return bad
		}
		v.SetUint(n.U)
	case reflect.Float32, reflect.Float64:
		if n.K != 4 {
			return bad
		}
		v.SetFloat(n.F[0])
	case reflect.Complex64, reflect.Complex128:
		if n.K != 5 {
			return bad
		}
		v.SetComplex(complex(n.F[0], n.F[1]))
	case reflect.String:
		if n.K != 6 {
			return bad
		}
		v.SetString(n.S)
	case reflect.Array:
		if n.K != 7 || len(n.E) != v.Len() {
			return bad
		}
		for i := range n.E {
			if err := d.dec(n.E[i], v.Index(i)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		if n.K != 7 {
			return bad
		}
		s := reflect.MakeSlice(v.Type(), len(n.E), len(n.E))
		for i := range n.E {
			if err := d.dec(n.E[i], s.Index(i)); err != nil {
				return err
			}
		}
		v.Set(s)
	case reflect.Map:
		if n.K != 8 {
			return bad
		}
		m := reflect.MakeMapWithSize(v.Type(), len(n.E)/2)
		for i := 0; i+1 < len(n.E); i += 2 {
			key := reflect.New(v.Type().Key()).Elem()
			if err := d.dec(n.E[i], key); err != nil {
				return err
			}
			val := reflect.New(v.Type().Elem()).Elem()
			if err := d.dec(n.E[i+1], val); err != nil {
				return err
			}
			m.SetMapIndex(key, val)
		}
		v.Set(m)
	case reflect.Struct:
		if n.K != 9 || len(n.N) != v.NumField() {
			return bad
		}
		for i, name := range n.N {
			if v.Type().Field(i).Name != name {
				return bad
			}
			if err := d.dec(n.E[i], v.Field(i)); err != nil {
				return err
			}
		}
	case reflect.Ptr:
		if n.K != 10 {
			return bad
		}
		if p, ok := d.ptrs[n.R]; ok {
			if p.Type() != v.Type() {
				return bad
			}
			v.Set(p)
			return nil
		}
		p := reflect.New(v.Type().Elem())
		d.ptrs[n.R] = p
		if len(n.E) > 0 {
			if err := d.dec(n.E[0], p.Elem()); err != nil {
				return err
			}
		}
		v.Set(p)
	case reflect.Interface:
		t, ok := _execboxTypes[n.T]
		if n.K != 11 || !ok || len(n.E) != 1 || !t.AssignableTo(v.Type()) {
			return bad
		}
		x := reflect.New(t).Elem()
		if err := d.dec(n.E[0], x); err != nil {
			return err
		}
		v.Set(x)
	default:
		return bad
	}
	return nil
}

func _execboxRestore() {
	f, err := os.Open(_execboxStatePath)
	if err != nil {
		return
	}
	defer f.Close()
	var state map[string]_execboxNode
	if gob.NewDecoder(f).Decode(&state) != nil {
		return
	}
	d := &_execboxDec{ptrs: map[int]reflect.Value{}}
	for _, v := range _execboxVars {
		n, ok := state[v.name]
		if !ok {
			continue
		}
		dst := reflect.ValueOf(v.ptr).Elem()
		x := reflect.New(dst.Type()).Elem()
		if d.dec(n, x) == nil {
			dst.Set(x)
		}
	}
}

// Runs when the cell's statements end, also when they panic (a deferred call that never
// recovers the cell's panic).
func _execboxSave() {
	func() {
		defer func() {
			if r := recover(); r != nil {
				fmt.Fprintf(os.Stderr, "note: the variables could not be kept: %v\n", r)
			}
		}()
		e := &_execboxEnc{ptrs: map[_execboxPtrKey]int{}}
		state := map[string]_execboxNode{}
		for _, v := range _execboxVars {
			n, err := e.enc(reflect.ValueOf(v.ptr).Elem(), 0)
			if err != nil {
				fmt.Fprintf(os.Stderr, "note: %s is not kept for the next cells (%v): they see its zero value\n", v.name, err)
				continue
			}
			state[v.name] = n
		}
		tmp := _execboxStatePath + ".tmp"
		f, err := os.Create(tmp)
		if err != nil {
			fmt.Fprintf(os.Stderr, "note: the variables could not be kept: %v\n", err)
			return
		}
		err = gob.NewEncoder(f).Encode(state)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(tmp, _execboxStatePath)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "note: the variables could not be kept: %v\n", err)
		}
	}()
}
`
