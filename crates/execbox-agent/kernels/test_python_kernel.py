"""Tests of python_kernel.py, driven the way execbox-agent drives it.

Run: python3 -m pytest -q crates/execbox-agent/kernels/test_python_kernel.py

The kernel runs under the python3 on PATH (what sandboxes use), or $KERNEL_PYTHON, even when
pytest itself runs under another interpreter: matplotlib/pandas must be installed there.
"""

import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import pytest

KERNEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_kernel.py")
PYTHON = os.environ.get("KERNEL_PYTHON") or shutil.which("python3") or sys.executable
# The interpreter itself, not a wrapper (pyenv shims are shell scripts): startup is measured.
PYTHON = subprocess.run(
    [PYTHON, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, check=True
).stdout.strip()


def _has_modules(*names):
    code = "import " + ", ".join(names)
    return subprocess.run([PYTHON, "-c", code], capture_output=True).returncode == 0


HAS_MPL = _has_modules("matplotlib")
HAS_PANDAS = _has_modules("pandas")
if not (HAS_MPL and HAS_PANDAS):
    sys.stderr.write(
        "\n!!! matplotlib/pandas are NOT installed for %s: their tests are SKIPPED !!!\n"
        "!!! install them with: %s -m pip install matplotlib pandas !!!\n" % (PYTHON, PYTHON)
    )


class Kernel:
    """A kernel process: fd 3 = socketpair end, stdout/stderr = pipes, stdin = /dev/null.

    Like the agent, output is drained from the pipes before each control message is recorded,
    so `events` is the ordered stream a client would see."""

    def __init__(self, cwd=None):
        self.sock, child = socket.socketpair()
        child_fd = child.fileno()

        def to_fd3():
            if child_fd == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(child_fd, 3)  # dup2 clears close-on-exec
            os.setpgid(0, 0)  # own process group, as the agent starts it

        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [PYTHON, "-S", KERNEL],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=to_fd3,
            close_fds=False,  # keep the dup2'ed fd 3 (all other fds are close-on-exec)
            cwd=cwd,
        )
        child.close()
        for f in (self.proc.stdout, self.proc.stderr):
            os.set_blocking(f.fileno(), False)
        self.buf = b""
        self.events = []
        ready = self.read_message(timeout=20)
        self.startup = time.perf_counter() - self.started
        assert ready == {"ev": "ready", "language": "python", "version": ready["version"],
                         "display_acks": True}
        assert ready["version"] == "%d.%d.%d" % self._version()

    def _version(self):
        out = subprocess.run(
            [PYTHON, "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True, text=True,
        ).stdout.split()
        return tuple(int(x) for x in out)

    def _drain(self):
        for name, f in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            while True:
                try:
                    chunk = os.read(f.fileno(), 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                text = chunk.decode("utf-8", "replace")
                if self.events and self.events[-1][0] == name:
                    self.events[-1] = (name, self.events[-1][1] + text)
                else:
                    self.events.append((name, text))

    def read_message(self, timeout=10):
        """The next control message (None at EOF), draining the output pipes meanwhile so
        the kernel never blocks on a full pipe."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no control message; events so far: %r" % self.events)
            r, _, _ = select.select([self.sock, self.proc.stdout, self.proc.stderr], [], [], left)
            if self.sock in r:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self._drain()
                    return None
                self.buf += chunk
            else:
                self._drain()
        line, _, self.buf = self.buf.partition(b"\n")
        self._drain()  # output written before the message is in the pipes now
        return json.loads(line)

    def execute(self, code, timeout=30):
        """Runs code; returns the events (output and messages) up to and including done."""
        self.events = []
        self.sock.sendall((json.dumps({"op": "execute", "code": code}) + "\n").encode())
        while True:
            msg = self.read_message(timeout)
            assert msg is not None, "kernel died: %r" % self.events
            self.events.append(("msg", msg))
            if msg["ev"] == "display":
                # As the agent does: the kernel waits for this before it goes on.
                self.sock.sendall(b'{"op":"ack"}\n')
            if msg["ev"] == "done":
                return self.events

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def msgs(events, ev=None):
    return [m for kind, m in events if kind == "msg" and (ev is None or m["ev"] == ev)]


def stdout(events):
    return "".join(text for kind, text in events if kind == "stdout")


def stderr(events):
    return "".join(text for kind, text in events if kind == "stderr")


def done(events):
    d = msgs(events, "done")
    assert len(d) == 1 and events[-1] == ("msg", d[0])
    return d[0]


@pytest.fixture
def k(tmp_path):
    kernel = Kernel(cwd=str(tmp_path))
    yield kernel
    kernel.close()


def test_ready_and_expression_result(k):
    ev = k.execute("2+2")
    assert msgs(ev, "result") == [{"ev": "result", "execution_count": 1, "data": {"text/plain": "4"}}]
    assert done(ev) == {"ev": "done", "execution_count": 1, "ok": True}


def test_state_persists_and_underscore(k):
    assert done(k.execute("x = 20\ndef f(y):\n    return x + y"))["ok"]
    ev = k.execute("f(1) * 2")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "42"
    ev = k.execute("_ + 1")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "43"
    ev = k.execute("__name__, __builtins__ is __import__('builtins'), __import__('sys').argv")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "('__main__', True, [''])"


def test_no_result_for_none_statement_or_semicolon(k):
    assert msgs(k.execute("None"), "result") == []
    assert msgs(k.execute("y = 3"), "result") == []
    assert msgs(k.execute("y;  # hidden"), "result") == []
    assert msgs(k.execute("y; y"), "result")[0]["data"] == {"text/plain": "3"}


def kinds(events):
    return [(kind, m if kind != "msg" else m["ev"]) for kind, m in events]


def test_output_and_result_order(k):
    # Output written before a control message precedes it. (Across the two pipes, and for
    # output written right after a message, order depends on when the reader drains them,
    # as in the agent: hence the pauses.)
    ev = k.execute("import sys, time\nprint('a')\nprint('err', file=sys.stderr)\n'r'")
    assert stdout(ev) == "a\n" and stderr(ev) == "err\n"
    assert [m["ev"] for m in msgs(ev)] == ["result", "done"]
    assert ev.index(("msg", msgs(ev)[0])) == 2, ev
    ev = k.execute("print('before'); display('shown'); time.sleep(0.05); print('after')")
    assert kinds(ev) == [("stdout", "before\n"), ("msg", "display"), ("stdout", "after\n"),
                         ("msg", "done")], kinds(ev)
    ev = k.execute("for i in range(3):\n    print(i)\n    display(i)\n    time.sleep(0.02)")
    assert kinds(ev) == [("stdout", "0\n"), ("msg", "display"), ("stdout", "1\n"),
                         ("msg", "display"), ("stdout", "2\n"), ("msg", "display"),
                         ("msg", "done")], kinds(ev)


def test_name_error(k):
    k.execute("1")
    ev = k.execute("print('x')\nx")
    (err,) = msgs(ev, "error")
    assert err["ename"] == "NameError"
    assert err["evalue"] == "name 'x' is not defined"
    tb = err["traceback"]
    assert tb[0] == "Traceback (most recent call last):"
    assert tb[1] == '  File "<cell-2>", line 2, in <module>'
    assert tb[2].strip() == "x"  # the source line, from linecache
    assert tb[-1] == "NameError: name 'x' is not defined"
    assert not any("python_kernel" in line for line in tb), tb
    assert done(ev) == {"ev": "done", "execution_count": 2, "ok": False}
    assert stdout(ev) == "x\n"


def test_traceback_through_functions_of_earlier_cells(k):
    k.execute("def bad():\n    return 1 / 0")
    (err,) = msgs(k.execute("bad()"), "error")
    assert err["ename"] == "ZeroDivisionError"
    text = "\n".join(err["traceback"])
    assert '"<cell-1>", line 2, in bad' in text and "return 1 / 0" in text
    assert '"<cell-2>", line 1' in text


def test_syntax_error(k):
    ev = k.execute("x = = 1")
    (err,) = msgs(ev, "error")
    assert err["ename"] == "SyntaxError"
    assert any("<cell-1>" in line for line in err["traceback"])
    assert err["traceback"][-1].startswith("SyntaxError")
    assert not any("python_kernel" in line for line in err["traceback"])
    assert done(ev)["ok"] is False
    (err,) = msgs(k.execute("return 5"), "error")
    assert err["ename"] == "SyntaxError" and "outside function" in err["evalue"]


def test_display_rich_reprs(k):
    code = (
        "class H:\n"
        "    def _repr_html_(self): return '<b>hi</b>'\n"
        "    def _repr_markdown_(self): return None\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "    def _repr_json_(self): return ({'a': [1, 2]}, {'expanded': True})\n"
        "    def __repr__(self): return 'H()'\n"
        "display(H())\n"
        "H()"
    )
    ev = k.execute(code)
    (disp,) = msgs(ev, "display")
    expected = {"text/plain": "H()", "text/html": "<b>hi</b>", "image/png": "iVBORw==",
                "application/json": {"a": [1, 2]}}
    assert disp["data"] == expected
    assert msgs(ev, "result")[0]["data"] == expected


def test_mimebundle_and_raw_display(k):
    code = (
        "class M:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/html': '<i>m</i>', 'image/svg+xml': '<svg/>'}\n"
        "display(M(), {'text/plain': 'raw', 'text/markdown': '# t'}, raw=False)\n"
        "display({'text/plain': 'raw', 'text/markdown': '# t'}, raw=True)"
    )
    ev = k.execute(code)
    d = [m["data"] for m in msgs(ev, "display")]
    assert d[0]["text/html"] == "<i>m</i>" and d[0]["image/svg+xml"] == "<svg/>"
    assert d[1] == {"text/plain": "{'text/plain': 'raw', 'text/markdown': '# t'}"}
    assert d[2] == {"text/plain": "raw", "text/markdown": "# t"}


def test_failing_repr_method_is_skipped_and_bad_repr_is_an_error(k):
    code = (
        "class B:\n"
        "    def _repr_html_(self): raise ValueError('nope')\n"
        "    def __repr__(self): return 'B'\n"
        "B()"
    )
    ev = k.execute(code)
    assert msgs(ev, "result")[0]["data"] == {"text/plain": "B"}
    assert "ValueError: nope" in stderr(ev)
    ev = k.execute("class C:\n    def __repr__(self): raise RuntimeError('r')\nC()")
    assert msgs(ev, "error")[0]["ename"] == "RuntimeError"
    assert done(k.execute("1"))["ok"]


def test_unicode_and_newlines_in_messages(k):
    ev = k.execute("s = 'é☃\\n\"x\"'\ns")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == repr("é☃\n\"x\"")
    ev = k.execute("print('\\udcff'.encode('utf-8', 'surrogateescape').decode('latin-1'))\n'\\ud800'")
    assert done(ev)["ok"]


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib NOT installed for the kernel's python")
def test_matplotlib_show_and_implicit(k):
    ev = k.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nprint('before')\n"
                   "plt.show()\nimport time; time.sleep(0.05)\nprint('after')")
    assert kinds(ev) == [("stdout", "before\n"), ("msg", "display"), ("stdout", "after\n"),
                     ("msg", "done")], (kinds(ev), stderr(ev))
    png = msgs(ev, "display")[0]["data"]["image/png"]
    import base64

    assert base64.b64decode(png).startswith(b"\x89PNG")
    # Without show(): the open figure is displayed at the end of the cell, then closed.
    ev = k.execute("plt.figure(); plt.plot([3, 1]); print('x')")
    assert [m["ev"] for m in msgs(ev)] == ["display", "done"], ev
    assert "image/png" in msgs(ev, "display")[0]["data"]
    assert stdout(ev) == "x\n"
    ev = k.execute("len(plt.get_fignums())")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "0"
    assert msgs(ev, "display") == []


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib NOT installed for the kernel's python")
def test_matplotlib_figure_as_result_shown_once(k):
    ev = k.execute("import matplotlib\nmatplotlib.get_backend()")
    assert msgs(ev, "result")[0]["data"]["text/plain"].lower() == "'agg'"
    ev = k.execute("from matplotlib import pyplot as plt\nfig, ax = plt.subplots()\n"
                   "ax.plot([1, 2, 3])\nfig")
    assert [m["ev"] for m in msgs(ev)] == ["result", "done"], ev
    data = msgs(ev, "result")[0]["data"]
    assert "image/png" in data and data["text/plain"].startswith("<Figure")


@pytest.mark.skipif(not HAS_PANDAS, reason="pandas NOT installed for the kernel's python")
def test_pandas_dataframe_html(k):
    ev = k.execute("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    data = msgs(ev, "result")[0]["data"]
    assert "<table" in data["text/html"]
    assert "a" in data["text/plain"]


def test_interrupt_keeps_state(k):
    k.execute("state = 'kept'")
    k.events = []
    k.sock.sendall(b'{"op":"execute","code":"import time\\nprint(1)\\ntime.sleep(10)"}\n')
    t0 = time.monotonic()
    time.sleep(0.3)
    os.killpg(k.proc.pid, signal.SIGINT)
    while True:
        msg = k.read_message(5)
        k.events.append(("msg", msg))
        if msg["ev"] == "done":
            break
    assert time.monotonic() - t0 < 3
    (err,) = msgs(k.events, "error")
    assert err["ename"] == "KeyboardInterrupt"
    assert any("<cell-2>" in line for line in err["traceback"])
    assert not any("python_kernel" in line for line in err["traceback"]), err
    assert done(k.events) == {"ev": "done", "execution_count": 2, "ok": False}
    ev = k.execute("state")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "'kept'"


def test_interrupt_of_busy_loop_and_user_handler_reset(k):
    k.sock.sendall(b'{"op":"execute","code":"while True:\\n    pass"}\n')
    time.sleep(0.3)
    os.killpg(k.proc.pid, signal.SIGINT)
    k.events = []
    while True:
        msg = k.read_message(5)
        k.events.append(("msg", msg))
        if msg["ev"] == "done":
            break
    assert msgs(k.events, "error")[0]["ename"] == "KeyboardInterrupt"
    # User code restoring the default handler must not make idle SIGINTs fatal.
    assert done(k.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)"))["ok"]
    os.killpg(k.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    assert k.proc.poll() is None
    assert done(k.execute("1"))["ok"]


def test_sigint_when_idle_is_harmless(k):
    k.execute("v = 7")
    for _ in range(5):
        os.killpg(k.proc.pid, signal.SIGINT)
        time.sleep(0.05)
    time.sleep(0.2)
    assert k.proc.poll() is None
    r, _, _ = select.select([k.sock], [], [], 0.1)
    assert not r, "no message expected while idle"
    ev = k.execute("v")
    assert msgs(ev, "error") == []
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "7"


def test_system_exit_and_exit_survive(k):
    for code in ("import sys\nsys.exit(3)", "exit()", "quit(1)", "raise SystemExit('bye')"):
        ev = k.execute(code)
        (err,) = msgs(ev, "error")
        assert err["ename"] == "SystemExit", err
        assert done(ev)["ok"] is False
    assert k.proc.poll() is None
    assert msgs(k.execute("'alive'"), "result")[0]["data"]["text/plain"] == "'alive'"


def test_execution_count_increments(k):
    counts = [done(k.execute(c))["execution_count"] for c in ("1", "x", "def (", "2")]
    assert counts == [1, 2, 3, 4]
    assert msgs(k.execute("5"), "result")[0]["execution_count"] == 5


def test_input_eof_and_cwd_imports(k, tmp_path):
    (err,) = msgs(k.execute("input()"), "error")
    assert err["ename"] == "EOFError"
    (tmp_path / "mymod.py").write_text("VALUE = 11\n")
    ev = k.execute("import mymod, os\nmymod.VALUE, os.getcwd() == %r" % str(tmp_path))
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "(11, True)"


def test_pickle_of_user_class_and_top_level_await(k):
    ev = k.execute("import pickle\nclass P:\n    pass\ntype(pickle.loads(pickle.dumps(P()))).__name__")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "'P'"
    ev = k.execute("import asyncio\nawait asyncio.sleep(0)\nawait asyncio.sleep(0, 'aw')")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "'aw'"


def test_fd3_not_inherited_and_eof_exits(k):
    # `readlink` runs in a child of sh: only an inherited fd 3 of sh itself would show.
    ev = k.execute("import subprocess\nsubprocess.run(['sh', '-c', 'readlink /proc/$$/fd/3; echo end'], "
                   "close_fds=False, capture_output=True, text=True).stdout")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == repr("end\n")
    assert done(k.execute("import os\nos.system('readlink /proc/$$/fd/3')"))["ok"]
    assert "socket" not in stdout(k.events)
    k.sock.shutdown(socket.SHUT_WR)
    assert k.proc.wait(5) == 0


def test_startup_time_and_idle_memory(k):
    print("\nkernel startup (spawn -> ready): %.1f ms" % (k.startup * 1000))
    with open("/proc/%d/status" % k.proc.pid) as f:
        rss = [l.strip() for l in f if l.startswith("VmRSS")]
    with open("/proc/%d/smaps_rollup" % k.proc.pid) as f:
        private = [l.strip() for l in f if l.startswith("Private_")]
    print("idle memory:", rss, private)
    modules = eval(msgs(k.execute("sorted(__import__('sys').modules)"), "result")[0]["data"]["text/plain"])
    for heavy in ("socket", "matplotlib", "IPython", "asyncio", "numpy", "traceback"):
        assert heavy not in modules, heavy
    assert k.startup < 2.0  # generous: CI machines vary; the measured value is printed


def test_execute_round_trip_time(k):
    times = []
    for _ in range(1000):
        t0 = time.perf_counter()
        k.execute("print(1)")
        times.append(time.perf_counter() - t0)
    assert stdout(k.events) == "1\n"
    times.sort()
    p50 = statistics.median(times)
    p99 = times[int(len(times) * 0.99)]
    print("\nprint(1) round trip over 1000 executes: p50 %.1f us, p99 %.1f us, mean %.1f us"
          % (p50 * 1e6, p99 * 1e6, statistics.mean(times) * 1e6))
    assert p50 < 0.005


HAS_IPYTHON = _has_modules("IPython")


@pytest.mark.skipif(not HAS_IPYTHON, reason="IPython not installed for the kernel's python")
def test_ipython_formatter_and_display(k):
    ev = k.execute("import sys\nclass F:\n    pass\n"
                   "class P:\n    def _repr_pretty_(self, p, cycle):\n        p.text('pretty!')\n"
                   "F()")
    assert msgs(ev, "result")[0]["data"]["text/plain"].startswith("<__main__.F object at")
    # IPython (~280 ms, ~36 MB) is only imported for objects it can format better.
    ev = k.execute("'IPython' in sys.modules")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "False"
    ev = k.execute("P()")
    assert msgs(ev, "result")[0]["data"] == {"text/plain": "pretty!"}
    ev = k.execute("from IPython.display import display as d, HTML, Markdown\n"
                   "d(HTML('<p>x</p>'), Markdown('*m*'))\nHTML('<i>r</i>')")
    assert [m["data"].get("text/html") for m in msgs(ev, "display")] == ["<p>x</p>", None]
    assert msgs(ev, "display")[1]["data"]["text/markdown"] == "*m*"
    assert msgs(ev, "result")[0]["data"]["text/html"] == "<i>r</i>"


def test_interrupt_during_large_displays_keeps_the_channel_intact(k):
    # SIGINT while a long control line is being written must not cut it (the kernel defers
    # the interrupt until the line is complete): every line still parses.
    k.sock.sendall(b'{"op":"execute","code":"big = \'x\' * 400000\\nwhile True:\\n'
                   b'    display({\'text/plain\': big}, raw=True)"}\n')
    time.sleep(0.3)
    k.events = []
    os.killpg(k.proc.pid, signal.SIGINT)
    while True:
        msg = k.read_message(10)  # json.loads of every line
        k.events.append(("msg", msg))
        if msg["ev"] == "done":
            break
    displays = msgs(k.events, "display")
    assert all(len(m["data"]["text/plain"]) == 400000 for m in displays)
    assert msgs(k.events, "error")[0]["ename"] == "KeyboardInterrupt"
    assert msgs(k.execute("len(big)"), "result")[0]["data"]["text/plain"] == "400000"


def test_warnings_and_future_flags(k):
    ev = k.execute("import warnings\nwarnings.warn('careful')")
    assert "<cell-1>:2: UserWarning: careful" in stderr(ev)
    assert "warnings.warn('careful')" in stderr(ev)  # the source line, via linecache
    k.execute("from __future__ import annotations")
    ev = k.execute("def f(x: Undefined) -> None: pass\nf.__annotations__['x']")
    assert msgs(ev, "result")[0]["data"]["text/plain"] == "'Undefined'"
