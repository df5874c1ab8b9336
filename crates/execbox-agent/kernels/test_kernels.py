"""Tests of the JavaScript/TypeScript (js_kernel.js) and Java (JavaKernel.java) kernels.

Each kernel is started the way execbox-agent starts it: own process group, stdin /dev/null,
stdout/stderr on pipes, one end of a unix socketpair as fd 3. Like the agent, the harness
drains stdout/stderr before handling each control message, so output order is checkable.

Run: python -m pytest crates/execbox-agent/kernels/test_kernels.py -s  (-s shows timings)
Needs node; bun (npm install -g bun) for bun and TypeScript; java 17 with jdk.jshell.
"""

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time

import pytest

KDIR = os.path.dirname(os.path.abspath(__file__))
JS = os.path.join(KDIR, "js_kernel.js")
JAVA = os.path.join(KDIR, "JavaKernel.java")

NODE = shutil.which("node")
BUN = shutil.which("bun")
JAVA_BIN = shutil.which("java")
JSHELL = shutil.which("jshell")

NO_BUN = "BUN IS NOT INSTALLED (npm install -g bun): bun and TypeScript kernel tests SKIPPED"


def _kernel_child_setup(cfd):
    # The socket at fd 3, and SIGINT at its default as the agent starts kernels (a test run
    # started in the background by a shell inherits SIGINT ignored, and a kernel started with
    # it ignored cannot be interrupted).
    os.dup2(cfd, 3)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Kernel:
    def __init__(self, argv, cwd, ready_timeout=60):
        t0 = time.monotonic()
        self.sock, child = socket.socketpair()
        cfd = child.fileno()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # fd 3 must survive close_fds; dup2 makes the socket fd 3 (and inheritable).
            pass_fds=sorted({3, cfd}),
            preexec_fn=lambda: _kernel_child_setup(cfd),
            start_new_session=True,
        )
        child.close()
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
        self.sock.setblocking(False)
        self.buf = b""
        self.stdout = ""
        self.stderr = ""
        self.events = []  # ("stdout"|"stderr", text) or ("msg", dict), in agent order
        msg = self._next_message(ready_timeout)
        self.startup = time.monotonic() - t0
        assert msg is not None, f"no ready message; stderr: {self.stderr}"
        self.ready = msg

    def _drain(self):
        for name, f in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            while True:
                try:
                    data = os.read(f.fileno(), 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                text = data.decode("utf-8", "replace")
                setattr(self, name, getattr(self, name) + text)
                self.events.append((name, text))

    def _next_message(self, timeout):
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no control message; stderr: {self.stderr}")
                if sel.select(min(left, 0.2)):
                    data = self.sock.recv(65536)
                    if not data:
                        self._drain()
                        return None
                    self.buf += data
                self._drain()
            line, self.buf = self.buf.split(b"\n", 1)
            # The agent's rule: output produced before the message is handled first.
            self._drain()
            msg = json.loads(line)
            self.events.append(("msg", msg))
            return msg
        finally:
            sel.close()

    def send(self, code, **extra):
        self.sock.setblocking(True)
        msg = {"op": "execute", "code": code, **extra}
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        self.sock.setblocking(False)

    def collect(self, timeout=30):
        """Messages up to and including `done`."""
        msgs = []
        while True:
            m = self._next_message(timeout)
            assert m is not None, f"kernel died; stderr: {self.stderr}"
            msgs.append(m)
            if m["ev"] == "done":
                return msgs

    def run(self, code, timeout=30, **extra):
        start = len(self.events)
        self.send(code, **extra)
        msgs = self.collect(timeout)
        return Result(msgs, self.events[start:])

    def interrupt(self):
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(timeout=10)  # EOF on fd 3 ends the kernel
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("kernel did not exit at EOF on fd 3")
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


class Result:
    def __init__(self, msgs, events):
        self.msgs = msgs
        self.events = events
        self.done = msgs[-1]
        self.ok = self.done["ok"]
        self.results = [m for m in msgs if m["ev"] == "result"]
        self.errors = [m for m in msgs if m["ev"] == "error"]
        self.stdout = "".join(t for k, t in events if k == "stdout")
        self.stderr = "".join(t for k, t in events if k == "stderr")

    @property
    def text(self):
        return self.results[-1]["data"]["text/plain"] if self.results else None


def runtimes():
    out = []
    if NODE:
        out.append(pytest.param([NODE], id="node"))
    out.append(pytest.param([BUN], id="bun", marks=pytest.mark.skipif(not BUN, reason=NO_BUN)))
    return out


@pytest.fixture(params=runtimes())
def js(request, tmp_path):
    k = Kernel(request.param + [JS, "javascript"], cwd=str(tmp_path), ready_timeout=20)
    yield k
    k.close()


# ----------------------------------------------------------------------------- JavaScript


def test_js_ready(js):
    assert js.ready["ev"] == "ready"
    assert js.ready["language"] == "javascript"
    assert js.ready["version"]


def test_js_expression(js):
    r = js.run("2+2")
    assert r.ok and r.text == "4"
    assert r.results[0]["execution_count"] == 1 and r.done["execution_count"] == 1
    assert js.run("'abc'").text == "'abc'"
    r = js.run("let q = 1")
    assert r.ok and r.results == [] and r.done["execution_count"] == 3


def test_js_state_and_redeclaration(js):
    assert js.run("let x = 1; const y = {a: 1}; var z = 3").ok
    r = js.run("let x = 2; x + y.a + z")
    assert r.ok, r.errors
    assert r.text == "6"
    assert js.run("const y = 10; y").text == "10"
    assert js.run("function f(a) { return a * 2 }\nclass C { m() { return 7 } }").ok
    assert js.run("f(21) + new C().m()").text == "49"
    assert js.run("class C { m() { return 8 } }\nnew C().m()").text == "8"
    r = js.run("let {a, b: [c, d = 4], ...rest} = {a: 1, b: [3], e: 5}")
    assert r.ok, r.errors
    assert js.run("[a, c, d, rest]").text == "[ 1, 3, 4, { e: 5 } ]"
    assert js.run("{a: 1}").text == "{ a: 1 }"
    assert js.run("if (x > 1) {\n  'big'\n} else { 'small' }").text == "'big'"


def test_js_top_level_await(js):
    r = js.run("const r = await new Promise(res => setTimeout(() => res(41), 10))\nr + 1")
    assert r.ok, r.errors
    assert r.text == "42"
    assert js.run("r").text == "41"  # declared in an await cell, still global
    r = js.run("await new Promise(res => setTimeout(res, 10)); function g() { return 'g' }\nlet h = 5")
    assert r.ok and r.results == []
    assert js.run("g() + h").text == "'g5'"
    r = js.run("const n = 3\nawait null\nn * 2")
    assert r.text == "6"


def test_js_require_and_import(js, tmp_path):
    r = js.run("const os = require('os'); typeof os.cpus")
    assert r.ok, r.errors
    assert r.text == "'function'"
    r = js.run("const p = await import('node:path'); p.join('a', 'b')")
    assert r.ok, r.errors
    assert r.text == "'a/b'"
    (tmp_path / "node_modules" / "localpkg").mkdir(parents=True)
    (tmp_path / "node_modules" / "localpkg" / "index.js").write_text("module.exports = {v: 7}\n")
    (tmp_path / "mod.mjs").write_text("export const w = 8\n")
    assert js.run("require('localpkg').v").text == "7"
    r = js.run("import {w} from './mod.mjs'\nimport * as fs from 'node:fs'\nw + (typeof fs.readFileSync)")
    assert r.ok, r.errors
    assert r.text == "'8function'"


def test_js_errors(js):
    r = js.run("zz + 1")
    assert not r.ok
    e = r.errors[0]
    assert e["ename"] == "ReferenceError" and e["evalue"] == "zz is not defined"
    assert e["traceback"][0] == "ReferenceError: zz is not defined"
    assert r.done["execution_count"] == 1
    r = js.run("await Promise.reject(new TypeError('boom'))")
    assert not r.ok and r.errors[0]["ename"] == "TypeError" and r.errors[0]["evalue"] == "boom"
    r = js.run("let = = 1")
    assert not r.ok and r.errors[0]["ename"] == "SyntaxError"
    r = js.run("throw 5")
    assert not r.ok and r.errors[0]["evalue"] == "5"
    # A timer failing after its cell ended goes to stderr; the kernel lives on.
    assert js.run("setTimeout(() => { throw new Error('later') }, 5); 1").text == "1"
    time.sleep(0.2)
    r = js.run("1+1")
    assert r.ok and r.text == "2"
    assert "later" in js.stderr


def test_js_output_order(js):
    r = js.run("console.log('hello'); process.stdout.write('raw\\n'); console.error('oops'); 5")
    assert r.ok
    kinds = [(k, v if k != "msg" else v["ev"]) for k, v in r.events]
    out_at = max(i for i, (k, _) in enumerate(kinds) if k == "stdout")
    err_at = max(i for i, (k, _) in enumerate(kinds) if k == "stderr")
    res_at = kinds.index(("msg", "result"))
    assert out_at < res_at and err_at < res_at, kinds
    assert r.stdout == "hello\nraw\n" and r.stderr == "oops\n"
    big = js.run("process.stdout.write('x'.repeat(1 << 20)); 'big'")  # more than a pipe holds
    assert big.text == "'big'" and len(big.stdout) == 1 << 20


def test_js_interrupt(js):
    assert js.run("let keep = 5").ok
    js.interrupt()  # idle: harmless
    time.sleep(0.1)
    assert js.run("keep").text == "5"
    js.send("while (true) {}")
    time.sleep(0.5)
    js.interrupt()
    r = Result(js.collect(10), [])
    assert not r.ok and r.errors[0]["ename"] == "Interrupted"
    assert js.run("keep + 1").text == "6"
    js.send("await new Promise(() => {})")  # never settles
    time.sleep(0.3)
    js.interrupt()
    r = Result(js.collect(10), [])
    assert not r.ok and r.errors[0]["ename"] == "Interrupted"
    assert js.run("keep").text == "5"


def test_js_display(js):
    r = js.run("display('<b>x</b>', 'text/html'); 1")
    assert [m["ev"] for m in r.msgs] == ["display", "result", "done"]
    assert r.msgs[0]["data"] == {"text/html": "<b>x</b>"}


def test_js_timing(js, capsys):
    js.run("1+1")
    t0 = time.perf_counter()
    for _ in range(200):
        r = js.run("1+1")
    per = (time.perf_counter() - t0) / 200
    assert r.text == "2"
    with capsys.disabled():
        print(f"\n[timing] {js.ready['version']}: startup {js.startup * 1000:.0f} ms, "
              f"execute '1+1' {per * 1000:.3f} ms round trip (200 runs)")
    assert per < 0.01


def test_typescript_needs_bun_under_node(tmp_path):
    if not NODE:
        pytest.skip("node not installed")
    k = Kernel([NODE, JS, "typescript"], cwd=str(tmp_path), ready_timeout=20)
    try:
        assert k.ready["ev"] == "fatal" and "bun" in k.ready["message"]
        assert k.proc.wait(timeout=10) == 1
    finally:
        k.close()


def test_typescript_stripped_by_the_agent_under_node(tmp_path):
    """`typescript stripped`: the agent sends JavaScript (types erased) and, for a cell that does
    not compile, the error to report; the kernel counts that cell like any other."""
    if not NODE:
        pytest.skip("node not installed")
    k = Kernel([NODE, JS, "typescript", "stripped"], cwd=str(tmp_path), ready_timeout=20)
    try:
        assert k.ready["ev"] == "ready" and k.ready["language"] == "typescript"
        r = k.run("const n = 41; n + 1")
        assert r.ok and r.text == "42" and r.done["execution_count"] == 1
        error = {"ename": "SyntaxError", "evalue": "Unexpected token", "traceback": ["cell[2]:1:7", "SyntaxError: Unexpected token"]}
        r = k.run("const = 1", error=error)
        assert not r.ok and r.done["execution_count"] == 2
        assert r.errors == [dict(ev="error", **error)]
        r = k.run("n")
        assert r.ok and r.text == "41" and r.done["execution_count"] == 3
    finally:
        k.close()


# ----------------------------------------------------------------------------- TypeScript


@pytest.fixture
def ts(tmp_path):
    if not BUN:
        print(NO_BUN)
        pytest.skip(NO_BUN)
    k = Kernel([BUN, JS, "typescript"], cwd=str(tmp_path), ready_timeout=20)
    yield k
    k.close()


def test_typescript(ts, capsys):
    assert ts.ready["language"] == "typescript"
    r = ts.run("const n: number = 41; n + 1")
    assert r.ok, r.errors
    assert r.text == "42"
    r = ts.run("interface P { name: string }\nconst p: P = {name: 'a'}\ntype T = string | number\np.name")
    assert r.ok, r.errors
    assert r.text == "'a'"
    r = ts.run("function add(a: number, b: number): number { return a + b }\nadd(n, 1)")
    assert r.text == "42"
    r = ts.run("const v = await Promise.resolve<number>(3) as number; v")
    assert r.ok and r.text == "3"
    r = ts.run("const bad: number = ;")
    assert not r.ok and r.errors[0]["ename"] == "SyntaxError"
    with capsys.disabled():
        print(f"\n[timing] typescript (bun {ts.ready['version']}): startup {ts.startup * 1000:.0f} ms")


# ----------------------------------------------------------------------------- Java


@pytest.fixture(scope="module")
def java(tmp_path_factory):
    if not (JAVA_BIN and JSHELL):
        pytest.skip("java/jshell not installed")
    k = Kernel([JAVA_BIN, JAVA], cwd=str(tmp_path_factory.mktemp("java")), ready_timeout=60)
    yield k
    k.close()


def test_java_ready(java, capsys):
    assert java.ready["ev"] == "ready" and java.ready["language"] == "java"
    assert java.ready["version"].split(".")[0].isdigit()
    with capsys.disabled():
        print(f"\n[timing] java {java.ready['version']}: startup {java.startup * 1000:.0f} ms")


def test_java_state(java):
    r = java.run("int x = 2+2;")
    assert r.ok and r.results == []
    r = java.run("x")
    assert r.ok and r.text == "4"
    r = java.run('String s = "ab";\ns + x')
    assert r.text == '"ab4"'
    assert java.run("int twice(int a) { return 2 * a; }\ntwice(x)").text == "8"


def test_java_output(java):
    r = java.run('System.out.println("hi"); System.out.print("more"); System.err.println("err"); 1 + 1')
    assert r.ok and r.stdout == "hi\nmore" and r.stderr == "err\n" and r.text == "2"
    res_at = [i for i, (k, v) in enumerate(r.events) if k == "msg" and v["ev"] == "result"][0]
    assert all(i < res_at for i, (k, _) in enumerate(r.events) if k in ("stdout", "stderr"))
    t0 = time.perf_counter()
    for _ in range(20):
        java.run("1 + 1")
    per = (time.perf_counter() - t0) / 20
    print(f"[timing] java execute '1 + 1' {per * 1000:.1f} ms")


def test_java_errors(java):
    # Named as upstream's IJava kernel names them.
    r = java.run("int y = 1 / 0;")
    assert not r.ok
    e = r.errors[0]
    assert e["ename"] == "EvalException" and e["evalue"] == "/ by zero", e
    assert e["traceback"][1] == "java.lang.ArithmeticException: / by zero", e
    r = java.run('void f() { throw new IllegalStateException("bad"); }\nf()')
    e = r.errors[0]
    assert not r.ok and e["ename"] == "EvalException" and e["evalue"] == "bad", e
    assert e["traceback"][1] == "java.lang.IllegalStateException: bad", e
    r = java.run("int z = undefinedThing + 1;")
    e = r.errors[0]
    assert not r.ok and e["ename"] == "CompilationException" and e["evalue"] == "", e
    assert "cannot find symbol" in e["traceback"] and "int z = undefinedThing + 1;" in e["traceback"], e
    r = java.run("int w = ;")
    assert not r.ok and r.errors[0]["ename"] == "CompilationException"
    # Declared, though not callable yet (jshell's RECOVERABLE_DEFINED): no error, as upstream.
    assert java.run("void g() { missing(); }").ok
    r = java.run("g()")
    e = r.errors[0]
    assert not r.ok and e["ename"] == "UnresolvedReferenceException", e
    assert "Unresolved dependencies:" in e["traceback"] and "   - method missing()" in e["traceback"], e
    r = java.run("class Sub extends MissingBase {}")
    e = r.errors[0]
    assert not r.ok and e["ename"] == "CompilationException", e
    r = java.run("int q = (1 +")
    e = r.errors[0]
    assert not r.ok and e["ename"] == "IncompleteSourceException" and e["evalue"] == "int q = (1 +", e
    # Snippets after a failing one do not run.
    r = java.run('int a1 = 1 / 0;\nSystem.out.println("after");')
    assert not r.ok and "after" not in r.stdout
    assert java.run("40 + 2").text == "42"


def test_java_interrupt(java):
    assert java.run("int keep = 7;").ok
    java.interrupt()  # idle: harmless
    time.sleep(0.1)
    assert java.run("keep").text == "7"
    java.send("while (true) {}")
    time.sleep(1)
    java.interrupt()
    r = Result(java.collect(20), [])
    assert not r.ok and r.errors[0]["ename"] == "EvaluationInterruptedException"
    assert java.run("keep + 1").text == "8"


# ----------------------------------------------------------------------------- Go

GO_KERNEL = os.path.join(KDIR, "go_kernel.go")
GO_BIN = shutil.which("go")


@pytest.fixture(scope="module")
def go(tmp_path_factory):
    if not GO_BIN:
        pytest.skip("GO IS NOT INSTALLED (apt-get install golang-go): Go kernel tests SKIPPED")
    work = tmp_path_factory.mktemp("gowork")
    env = dict(os.environ, GOPROXY="off", GOTOOLCHAIN="local", GOSUMDB="off", CGO_ENABLED="0",
               GOCACHE=str(tmp_path_factory.getbasetemp() / "gocache"))
    os.environ.update(env)  # the kernel and the programs it builds inherit them
    binary = str(work / "kernel")
    subprocess.run([GO_BIN, "build", "-o", binary, GO_KERNEL], check=True)
    k = Kernel([binary, str(work)], cwd=str(tmp_path_factory.mktemp("go")), ready_timeout=120)
    yield k
    k.close()
    assert not os.path.exists(work), "the work directory goes at exit"


def test_go_ready(go):
    assert go.ready["ev"] == "ready" and go.ready["language"] == "go"


def test_go_state(go):
    r = go.run('import "fmt"\nx := 40\nfunc add(a, b int) int { return a + b }\nfmt.Println("first")')
    assert r.ok, r.errors
    assert r.stdout == "first\n"
    r = go.run("x = add(x, 2)\nfmt.Println(x)")
    assert r.ok, r.errors
    assert r.stdout == "42\n", "only this cell's output"
    r = go.run("x++\nfmt.Println(x)")
    assert r.stdout == "43\n", r.errors
    # Types, methods, unexported fields, pointers shared, maps, slices, interfaces.
    r = go.run('type point struct{ x, y int }\nfunc (p point) String() string { return fmt.Sprintf("(%d,%d)", p.x, p.y) }\n'
               'p := &point{1, 2}\nq := p\nm := map[string][]int{"a": {1, 2}}\nvar anything interface{} = point{3, 4}\nvar s fmt.Stringer = *p')
    assert r.ok, r.errors
    r = go.run('q.x = 10\nfmt.Println(p, m["a"], anything, s)')
    assert r.ok, r.errors
    assert r.stdout == "(10,2) [1 2] (3,4) (1,2)\n"
    # A variable redeclared with another type.
    r = go.run('x := "now a string"\nfmt.Println(x)')
    assert r.ok and r.stdout == "now a string\n", r.errors
    r = go.run('fmt.Println(len(x))')
    assert r.stdout == "12\n", r.errors
    # Functions see package-level variables of the same cell.
    r = go.run('var counter int\nfunc bump() { counter++ }\nbump()\nbump()')
    assert r.ok, r.errors
    r = go.run('bump()\nfmt.Println(counter)')
    assert r.stdout == "3\n", r.errors
    # A func value cannot be carried: a note, then its zero value.
    r = go.run('f := func() int { return 1 }\nfmt.Println(f())')
    assert r.ok and r.stdout == "1\n" and "f is not kept" in r.stderr, (r.errors, r.stderr)
    r = go.run('fmt.Println(f == nil)')
    assert r.stdout == "true\n", r.errors
    # import with time
    r = go.run('import "time"\nd := 3 * time.Second\nstart := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)')
    assert r.ok, r.errors
    r = go.run('fmt.Println(d, start.Year())')
    assert r.stdout == "3s 2020\n", r.errors


def test_go_errors(go):
    r = go.run("y := undefinedThing + 1")
    assert not r.ok
    e = r.errors[0]
    assert e["ename"] == "ERROR" and "undefined: undefinedThing" in e["evalue"], e
    assert e["evalue"].startswith("cell["), e
    # Nothing of a cell that does not compile is kept.
    r = go.run('func willNotStay() {}\nvar broken int = "s"')
    assert not r.ok
    r = go.run("willNotStay()")
    assert not r.ok and "undefined: willNotStay" in r.errors[0]["evalue"]
    r = go.run('import "fmt"\nfmt.Println("before")\nvar arr []int\n_ = arr[5]')
    assert not r.ok and "before\n" == r.stdout
    e = r.errors[0]
    assert e["ename"] == "ERROR" and e["evalue"].startswith("panic: runtime error: index out of range"), e
    assert any("cell[" in l for l in e["traceback"]), e
    r = go.run('import "os"\nos.Exit(3)')
    assert not r.ok and r.errors[0]["evalue"] == "exit status 3"
    r = go.run('fmt.Println("fine")')
    assert r.ok and r.stdout == "fine\n"


def test_go_main_and_interrupt(go):
    r = go.run('import "fmt"\nfunc main() { fmt.Println("in main") }')
    assert r.ok and r.stdout == "in main\n", r.errors
    r = go.run('fmt.Println("again")')
    assert r.stdout == "again\n", "main is not kept: " + r.stdout
    assert go.run("keep := 7").ok
    go.interrupt()  # idle: harmless
    time.sleep(0.1)
    go.send('fmt.Println("loop")\nfor {}')
    time.sleep(3)
    go.interrupt()
    r = Result(go.collect(20), [])
    assert not r.ok and r.errors[0]["ename"] == "ERROR" and r.errors[0]["evalue"] == "interrupted"
    r = go.run("fmt.Println(keep + 1)")
    assert r.stdout == "8\n", r.errors
