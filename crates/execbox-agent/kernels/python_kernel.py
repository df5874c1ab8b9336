"""execbox Python kernel: runs the code cells of one code context.

Started by execbox-agent as `python3 -u python_kernel.py` with stdout/stderr on pipes (the
program's own output) and fd 3 = a unix stream socket carrying newline-delimited JSON:

  agent -> kernel  {"op":"execute","code":"..."}            (one at a time)
  kernel -> agent  {"ev":"ready","language":"python","version":"3.11.7"}   (once, at start)
                   {"ev":"display","data":{mime: value}}     (display(), plt.show(), figures)
                   {"ev":"result","execution_count":N,"data":{mime: value}}
                   {"ev":"error","ename":..,"evalue":..,"traceback":[lines]}
                   {"ev":"done","execution_count":N,"ok":true|false}   (last, always)

stdout and stderr are flushed before every control message, so the agent, which drains the
pipes before handling a message, keeps output and messages in order. SIGINT interrupts the
running cell (KeyboardInterrupt) and is ignored while idle. EOF on fd 3 ends the kernel.

Only cheap modules are imported at start: context creation has to stay fast and idle kernels
small. Everything else (matplotlib, IPython, asyncio, traceback) is imported when needed.
"""

import sys
import os
import json
import ast
import signal
import linecache
import builtins
import _thread

_CTRL_FD = 3
_KERNEL_FILE = sys._getframe().f_code.co_filename
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: the cell used top-level await
_CO_FUTURE_ANNOTATIONS = 0x1000000  # __future__.annotations: persists across cells, as in Jupyter
_PyCF_TLA = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)

# Matplotlib must never try a GUI backend in a sandbox. Set before user code can import it.
os.environ["MPLBACKEND"] = "Agg"

# --- control channel -------------------------------------------------------------------------

# Raw fd I/O instead of the socket module: same syscalls, and `import socket` (selectors,
# enum) costs milliseconds of startup. The fd must not leak into programs the user starts.
os.set_inheritable(_CTRL_FD, False)
_ctrl_in = open(_CTRL_FD, "rb", buffering=65536, closefd=False)
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_send_lock = _thread.allocate_lock()  # user threads may call display() too
_main_thread = _thread.get_ident()

# SIGINT state. `_executing` is true only while user code (or work done for it) runs: then
# SIGINT raises KeyboardInterrupt. Otherwise it is only remembered in `_deferred`, so that it
# cannot hit the kernel's own code (a half-written control line would corrupt the channel).
_executing = False
_deferred = False


def _on_sigint(signum, frame):
    global _deferred
    if _executing:
        raise KeyboardInterrupt
    _deferred = True


def _flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # user code may have replaced or closed them
            pass


def _send(msg):
    """Writes one control message, after the output produced so far."""
    global _executing, _deferred
    # "replace": lone surrogates from user strings must not make the line unencodable.
    data = _encode(msg).encode("utf-8", "replace") + b"\n"
    main = _thread.get_ident() == _main_thread
    was = _executing
    if main:
        _executing = False  # defer SIGINT until the line is complete
    try:
        with _send_lock:
            _flush_output()
            while data:
                data = data[os.write(_CTRL_FD, data):]
    except OSError:
        # The agent is gone (or user code closed fd 3): nobody can use this kernel any more.
        _flush_output()
        os._exit(1)
    finally:
        if main:
            _executing = was
    if main and was and _deferred:
        _deferred = False
        raise KeyboardInterrupt


# --- user namespace ---------------------------------------------------------------------------

# A fresh module as __main__, so that pickle and multiprocessing find the user's classes and
# functions as `__main__.X`. The kernel's own module stays alive through this reference.
_kernel_module = sys.modules.get("__main__")
_user_module = type(sys)("__main__")
_user_ns = _user_module.__dict__
_user_ns["__builtins__"] = builtins
sys.modules["__main__"] = _user_module
sys.argv = [""]
# Imports resolve from the context's directory (cwd) like in Jupyter, not from the kernel's.
if sys.path and sys.path[0] == os.path.dirname(_KERNEL_FILE):
    sys.path[0] = ""


class _Exit:
    """exit()/quit(): raise SystemExit (reported as an error, the kernel keeps running).

    Unlike site's version, they do not close sys.stdin first."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "Use %s() to raise SystemExit" % self.name

    def __call__(self, code=None):
        raise SystemExit(code)


builtins.exit = _Exit("exit")
builtins.quit = _Exit("quit")

# --- rich output ------------------------------------------------------------------------------

# Types whose only representation is repr(): skips the rich-repr probing for common results.
_PLAIN_TYPES = frozenset(
    (int, float, complex, bool, str, bytes, bytearray, list, tuple, dict, set, frozenset,
     range, type(None))
)
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
    ("_repr_pdf_", "application/pdf"),
)
_BINARY_MIMES = frozenset(("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"))

_ipython_formatter = None  # None: not tried yet; False: IPython unavailable
_figures_shown = set()  # ids of figures displayed in this cell (not shown again at its end)


def _b64(data):
    import binascii  # builtin-ish and tiny; only needed for images

    return binascii.b2a_base64(bytes(data), newline=False).decode("ascii")


def _warn_repr_failure(obj, what):
    import traceback

    sys.stderr.write(
        "%s of %s object failed:\n%s" % (what, type(obj).__name__, traceback.format_exc())
    )


def _normalize(mime, value):
    """A MIME bundle value as JSON, or None to leave it out."""
    if value is None:
        return None
    if mime in _BINARY_MIMES or (mime.startswith("image/") and mime != "image/svg+xml"):
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _b64(value)
        return value if isinstance(value, str) else None  # str: already base64
    if mime == "application/json" or mime.endswith("+json"):
        try:  # must survive serialisation (and NaN is not JSON)
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            return None
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _safe_getattr(obj, name):
    try:
        return getattr(obj, name, None)
    except Exception:  # properties and __getattr__ of user objects may raise anything
        return None


def _figure_png(fig):
    if not fig.axes and not fig.lines:  # nothing drawn (as IPython's inline backend)
        return None
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # like Jupyter's inline backend
    return _b64(buf.getbuffer())


def _bundle(obj):
    """The MIME bundle of `obj`: text/plain plus whatever its rich-repr methods give."""
    if type(obj) in _PLAIN_TYPES:
        return {"text/plain": repr(obj)}
    data = {"text/plain": repr(obj)}
    # Classes have unbound _repr_*_ methods; objects answering every attribute (catch-all
    # __getattr__) would produce garbage: both get text/plain only (as IPython does).
    if isinstance(obj, type) or _safe_getattr(obj, "_ipython_canary_method_should_not_exist_"):
        return data
    rich = False
    figure_module = sys.modules.get("matplotlib.figure")
    if figure_module is not None and isinstance(obj, figure_module.Figure):
        rich = True
        _figures_shown.add(id(obj))
        png = _figure_png(obj)
        if png:
            data["image/png"] = png
    for name, mime in _REPR_METHODS:
        method = _safe_getattr(obj, name)
        if method is None or not callable(method):
            continue
        rich = True
        try:
            value = method()
        except Exception:
            _warn_repr_failure(obj, name)
            continue
        if isinstance(value, tuple):  # (data, metadata)
            value = value[0] if value else None
        value = _normalize(mime, value)
        if value is not None:
            data[mime] = value
    method = _safe_getattr(obj, "_repr_mimebundle_")
    if method is not None and callable(method):
        rich = True
        try:
            value = method(include=None, exclude=None)
        except Exception:
            _warn_repr_failure(obj, "_repr_mimebundle_")
            value = None
        if isinstance(value, tuple):
            value = value[0] if value else None
        if isinstance(value, dict):
            for mime, v in value.items():
                v = _normalize(str(mime), v)
                if v is not None:
                    data[str(mime)] = v
    if not rich:
        formatted = _format_with_ipython(obj)
        if formatted:
            data.update(formatted)
    return data


def _format_with_ipython(obj):
    """IPython's formatters for objects without rich reprs, when IPython is installed."""
    global _ipython_formatter
    if _ipython_formatter is None:
        try:  # heavy: imported once, and only for objects that may need it
            from IPython.core.formatters import DisplayFormatter

            _ipython_formatter = DisplayFormatter()
        except Exception:
            _ipython_formatter = False
    if not _ipython_formatter:
        return None
    try:
        formatted = _ipython_formatter.format(obj)
        if isinstance(formatted, tuple):
            formatted = formatted[0]
        out = {}
        for mime, v in (formatted or {}).items():
            v = _normalize(str(mime), v)
            if v is not None:
                out[str(mime)] = v
        return out
    except Exception:
        return None


def display(*objs, include=None, exclude=None, raw=False, **kwargs):
    """Show objects as rich output, like IPython's display().

    raw=True: each object is already a MIME bundle (dict). Other IPython keywords (metadata,
    display_id, ...) are accepted and ignored."""
    for obj in objs:
        if raw:
            if not isinstance(obj, dict):
                continue
            data = {}
            for mime, v in obj.items():
                v = _normalize(str(mime), v)
                if v is not None:
                    data[str(mime)] = v
        else:
            data = _bundle(obj)
        if include:
            data = {k: v for k, v in data.items() if k in include}
        if exclude:
            data = {k: v for k, v in data.items() if k not in exclude}
        if data:
            _send({"ev": "display", "data": data})


builtins.display = display

# --- matplotlib -------------------------------------------------------------------------------

_pyplot = None  # matplotlib.pyplot, once user code imported it (and it is patched)


def _show(*args, **kwargs):
    """plt.show() in execbox: sends every open figure as image/png, then closes them."""
    _flush_figures()


def _patch_pyplot(plt):
    global _pyplot
    plt.show = _show
    _pyplot = plt


def _check_pyplot():
    # Fallback for a pyplot imported without going through the import hook.
    if _pyplot is None:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            _patch_pyplot(plt)


def _flush_figures():
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if helpers is None or _pyplot is None:
        return
    managers = helpers.Gcf.get_all_fig_managers()
    if not managers:
        return
    try:
        for manager in managers:
            fig = manager.canvas.figure
            if id(fig) not in _figures_shown:
                display(fig)
    finally:
        # Closed even when rendering failed, or every later cell would fail again.
        _figures_shown.clear()
        _pyplot.close("all")


class _PyplotHook:
    """Meta path finder that patches matplotlib.pyplot as soon as it is imported, so that a
    plt.show() in the very cell that imports it already displays (in output order).

    It costs one cheap call per first import of a module; matplotlib is never imported by it."""

    def find_spec(self, name, path=None, target=None):
        if name != "matplotlib.pyplot":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_and_patch(module):
            exec_module(module)
            _patch_pyplot(module)

        try:  # loaders are per-module instances, so this affects pyplot only
            spec.loader.exec_module = exec_and_patch
        except Exception:
            pass  # _check_pyplot() still patches it after the cell
        return spec


sys.meta_path.insert(0, _PyplotHook())

# --- execution --------------------------------------------------------------------------------

_count = 0
_future_flags = 0
_loop = None  # asyncio event loop for cells with top-level await (created on first use)


def _run(code):
    global _loop
    value = eval(code, _user_ns)
    if code.co_flags & _CO_COROUTINE:
        if _loop is None:
            import asyncio

            _loop = asyncio.new_event_loop()
            asyncio.set_event_loop(_loop)
        value = _loop.run_until_complete(value)
    return value


def _compile(node, filename, mode):
    global _future_flags
    code = compile(node, filename, mode, _future_flags | _PyCF_TLA, True)
    _future_flags |= code.co_flags & _CO_FUTURE_ANNOTATIONS
    return code


def _run_cell(src, filename, n):
    tree = ast.parse(src, filename)
    body = tree.body
    if not body or not isinstance(body[-1], ast.Expr):
        _run(_compile(tree, filename, "exec"))
        return
    last = body.pop()
    if body:
        _run(_compile(tree, filename, "exec"))
    value = _run(_compile(ast.Expression(last.value), filename, "eval"))
    if value is None:
        return
    # A trailing `;` hides the value, as in Jupyter. end_col_offset counts UTF-8 bytes.
    lines = src.split("\n")
    if last.end_lineno <= len(lines):
        rest = lines[last.end_lineno - 1].encode("utf-8", "replace")[last.end_col_offset:]
        if rest.lstrip().startswith(b";"):
            return
    data = _bundle(value)
    _user_ns["_"] = value
    _send({"ev": "result", "execution_count": n, "data": data})


def _strip_kernel_frames(te, seen):
    if te is None or id(te) in seen:
        return
    seen.add(id(te))
    te.stack[:] = [f for f in te.stack if f.filename != _KERNEL_FILE]
    _strip_kernel_frames(te.__cause__, seen)
    _strip_kernel_frames(te.__context__, seen)
    for sub in getattr(te, "exceptions", None) or ():  # exception groups (3.11+)
        _strip_kernel_frames(sub, seen)


def _report_error(exc):
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
    ename = type(exc).__name__
    try:
        evalue = str(exc)
    except Exception:
        evalue = "<exception str() failed>"
    try:
        import traceback  # only errors need it

        te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        _strip_kernel_frames(te, set())
        lines = "".join(te.format()).split("\n")
        if lines and lines[-1] == "":
            lines.pop()
    except Exception:
        lines = ["%s: %s" % (ename, evalue)]
    _send({"ev": "error", "ename": ename, "evalue": evalue, "traceback": lines})


def _execute(src):
    global _count, _executing, _deferred
    _count += 1
    n = _count
    filename = "<cell-%d>" % n
    # Registered so that tracebacks, warnings and inspect show the cell's lines. mtime None:
    # linecache.checkcache() leaves the entry alone.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    _check_pyplot()
    _figures_shown.clear()
    ok = True
    _deferred = False  # a SIGINT received while idle is not for this cell
    try:
        try:
            _executing = True
            _run_cell(src, filename, n)
        finally:
            _executing = False
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the kernel survives
        ok = False
        _report_error_safely(e)
    _check_pyplot()
    if _pyplot is not None:
        # Figures still open at the end of the cell are shown (and closed), as in Jupyter.
        try:
            try:
                _executing = True
                _flush_figures()
            finally:
                _executing = False
        except BaseException as e:
            if ok:
                ok = False
                _report_error_safely(e)
    if signal.getsignal(signal.SIGINT) is not _on_sigint:
        signal.signal(signal.SIGINT, _on_sigint)  # user code replaced it; idle must stay safe
    _send({"ev": "done", "execution_count": n, "ok": ok})


def _report_error_safely(exc):
    try:
        _report_error(exc)
    except BaseException:
        _send({"ev": "error", "ename": type(exc).__name__, "evalue": "", "traceback": []})


def _main():
    signal.signal(signal.SIGINT, _on_sigint)
    _send({"ev": "ready", "language": "python", "version": "%d.%d.%d" % sys.version_info[:3]})
    readline = _ctrl_in.readline
    loads = json.loads
    while True:
        try:
            line = readline()
        except OSError:
            break
        if not line:
            break  # EOF: the agent closed the channel
        try:
            req = loads(line)
        except ValueError:
            continue
        if isinstance(req, dict) and req.get("op") == "execute":
            code = req.get("code")
            _execute(code if isinstance(code, str) else "")
    # os._exit: user threads or atexit handlers must not keep a discarded kernel alive.
    _flush_output()
    os._exit(0)


if __name__ == "__main__":
    _main()
