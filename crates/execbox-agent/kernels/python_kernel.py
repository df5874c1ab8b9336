"""execbox Python kernel: runs the code cells of one code context.

Started by execbox-agent as `python3 -S python_kernel.py` with stdout/stderr on pipes (the
program's own output) and fd 3 = a unix stream socket carrying newline-delimited JSON:

  agent -> kernel  {"op":"execute","code":"...","env":{...}?}   (one at a time)
                   {"op":"ack"}   (after each display message, when `ready` asked for acks)
  kernel -> agent  {"ev":"ready","language":"python","version":"3.11.7"}   (once, at start)
                   {"ev":"display","data":{mime: value}}     (display(), plt.show(), figures)
                   {"ev":"result","execution_count":N,"data":{mime: value}}
                   {"ev":"error","ename":..,"evalue":..,"traceback":[lines]}
                   {"ev":"done","execution_count":N,"ok":true|false}   (last, always)

stdout and stderr are flushed before every control message, so the agent, which drains the
pipes before handling a message, keeps output and messages in order. SIGINT interrupts the
running cell (KeyboardInterrupt) and is ignored while idle. EOF on fd 3 ends the kernel.

Startup has to stay fast (context creation) and idle kernels small, so only C modules are
imported at start: the C halves of json, ast and signal (their Python halves pull in re and
enum, ~12 ms), no socket module. linecache, traceback, matplotlib, IPython and asyncio are
imported when needed.
"""

import sys
import os
import builtins
import _thread


def _add_site_directories():
    """Started with -S: the host's Python may carry .pth hooks that run at every start (one
    seen here imports certifi: +28 ms and +4 MiB per kernel). The kernel adds the user and
    global site directories itself and honours the path lines of .pth files, not their
    import lines."""
    if not sys.flags.no_site:
        return
    import site  # with -S, importing site does not run site.main()

    dirs = []
    if site.check_enableusersite():
        dirs.append(site.getusersitepackages())
    dirs.extend(site.getsitepackages())
    for d in dirs:
        if not os.path.isdir(d) or d in sys.path:
            continue
        sys.path.append(d)
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(d, name), encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                line = line.strip()
                if not line or line.startswith(("#", "import ", "import\t")):
                    continue
                path = os.path.join(d, line)
                if os.path.isdir(path) and path not in sys.path:
                    sys.path.append(path)


_add_site_directories()


def _run_template_site_hook():
    """In a sandbox made from a template (EXECBOX_TEMPLATE set), the template's sitecustomize,
    on PYTHONPATH, puts its packages on sys.path between the user's and the system's
    site-packages. -S skips sitecustomize, so the kernel imports it, once the site directories
    above are in place, as site.main() would."""
    if not sys.flags.no_site or not os.environ.get("EXECBOX_TEMPLATE"):
        return
    try:
        import sitecustomize  # noqa: F401
    except Exception as e:
        print(f"execbox: the template's site hook failed: {e!r}", file=sys.stderr)


_run_template_site_hook()
# Line-buffered output: a print() reaches the agent as one chunk ("4\n", not "4" then "\n"),
# still line by line while a cell runs; the kernel flushes before every control message.
try:
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
except (AttributeError, ValueError):
    pass

try:
    import _signal as signal  # what signal.py wraps (minus enums)
except ImportError:
    import signal
try:
    import _ast as ast  # parse/compile flags and node classes; ast.py adds enum, contextlib
except ImportError:
    import ast

_CTRL_FD = 3
_KERNEL_FILE = sys._getframe().f_code.co_filename
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: the cell used top-level await
_CO_FUTURE_ANNOTATIONS = 0x1000000  # __future__.annotations: persists across cells, as in Jupyter
_PyCF_ONLY_AST = ast.PyCF_ONLY_AST
_PyCF_TLA = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)


def _unserializable(obj):
    raise TypeError("%s is not JSON serializable" % type(obj).__name__)


try:
    # json's C scanner and encoder, used directly: json/decoder.py and json/encoder.py import
    # re at load. The context object carries what json.JSONDecoder would give the scanner.
    from _json import make_scanner as _make_scanner, make_encoder as _make_encoder
    from _json import encode_basestring as _encode_str

    class _JsonContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                          "-Infinity": float("-inf")}.__getitem__

    _scan = _make_scanner(_JsonContext())

    def _loads(text):
        return _scan(text.strip(), 0)[0]

    def _json_encoder(check_circular):
        # allow_nan=False: NaN is not JSON, and the agent's parser would reject the line.
        encode = _make_encoder({} if check_circular else None, _unserializable, _encode_str,
                               None, ":", ",", False, False, False)
        return lambda obj: "".join(encode(obj, 0))

except ImportError:  # not CPython: the plain json module
    import json

    _loads = json.loads

    def _json_encoder(check_circular):
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                                check_circular=check_circular).encode

# Matplotlib must never try a GUI backend in a sandbox. Set before user code can import it.
os.environ["MPLBACKEND"] = "Agg"

# --- control channel -------------------------------------------------------------------------

# Raw fd I/O instead of the socket module: same syscalls, and `import socket` (selectors,
# enum) costs milliseconds of startup. The fd must not leak into programs the user starts.
os.set_inheritable(_CTRL_FD, False)
_ctrl_in = open(_CTRL_FD, "rb", buffering=65536, closefd=False)
_encode = _json_encoder(False)  # messages are trees; user JSON values are checked before
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
# (Not there under -P / PYTHONSAFEPATH, hence the check.)
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(_KERNEL_FILE)):
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

# --- cell sources -----------------------------------------------------------------------------

# Cell sources for linecache, so that tracebacks, warnings and inspect show the cells' lines.
# linecache (and tokenize, re) is only imported by whoever needs it, e.g. the first traceback;
# until then the entries wait here. mtime None: linecache.checkcache() leaves them alone.
_linecache = None
_pending_sources = {}


def _adopt_linecache(module):
    global _linecache
    module.cache.update(_pending_sources)
    _pending_sources.clear()
    _linecache = module


def _register_source(filename, src):
    entry = (len(src), None, src.splitlines(True), filename)
    if _linecache is None:
        module = sys.modules.get("linecache")
        if module is None:
            _pending_sources[filename] = entry
            return
        _adopt_linecache(module)
    _linecache.cache[filename] = entry


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
        try:  # must survive serialisation (cycles, NaN and odd types are not JSON)
            _json_encoder(True)(value)
        except (TypeError, ValueError, RecursionError):
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


def _figure_svg(fig):
    # Leap0's clients expect a shown figure as PNG and SVG.
    import io

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()


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
            data["image/svg+xml"] = _figure_svg(obj)
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
    # IPython's formatters only for objects they can do more for (_repr_pretty_), or once
    # IPython is loaded anyway: importing it costs ~280 ms and ~36 MB.
    if not rich and (
        _ipython_formatter
        or "IPython" in sys.modules
        or _safe_getattr(obj, "_repr_pretty_") is not None
        or _safe_getattr(obj, "_ipython_display_") is not None
    ):
        formatted = _format_with_ipython(obj)
        if formatted:
            data.update(formatted)
    return data


def _format_with_ipython(obj):
    """IPython's formatters (pretty printer, _ipython_display_), when IPython is installed."""
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
            _await_ack()


def _await_ack():
    """Waits until the agent has handled a display message: output printed after display()
    must reach the client after it, and the agent takes the output pipes' contents when it
    handles a message. Only the cell's own thread waits (it alone reads the channel)."""
    if not (_executing and _thread.get_ident() == _main_thread):
        return
    while True:
        line = _ctrl_in.readline()
        if not line:
            return
        try:
            req = _loads(line.decode("utf-8", "replace"))
        except Exception:
            continue
        if isinstance(req, dict) and req.get("op") == "ack":
            return


builtins.display = display


def _patch_ipython_display(module):
    # Outside an IPython shell, IPython.display.display() only prints; notebook code that
    # imports it gets this kernel's display() instead (IPython.display re-exports it).
    module.display = display


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


class _PostImportHook:
    """Meta path finder that adjusts a few modules as soon as they are loaded: matplotlib.pyplot
    (so that plt.show() in the very cell that imports it already displays, in output order),
    linecache (gets the cell sources) and IPython's display(). Per-cell checks of sys.modules
    are the fallback for the first two.

    It costs one cheap call per first import of a module and imports nothing itself."""

    def find_spec(self, name, path=None, target=None):
        hook = _POST_IMPORT.get(name)
        if hook is None:
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
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        # Only per-module loader instances are patched (never a shared loader class).
        if exec_module is None or isinstance(loader, type):
            return spec

        def exec_and_hook(module):
            exec_module(module)
            hook(module)

        try:
            loader.exec_module = exec_and_hook
        except Exception:
            pass
        return spec


_POST_IMPORT = {
    "matplotlib.pyplot": _patch_pyplot,
    "linecache": _adopt_linecache,
    "IPython.core.display_functions": _patch_ipython_display,  # IPython >= 7.23
    "IPython.core.display": _patch_ipython_display,  # older IPython defines display() here
}
sys.meta_path.insert(0, _PostImportHook())

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
    tree = compile(src, filename, "exec", _PyCF_ONLY_AST, True)  # = ast.parse
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
    _register_source(filename, src)
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
    _send({"ev": "ready", "language": "python", "version": "%d.%d.%d" % sys.version_info[:3],
           "display_acks": True})
    readline = _ctrl_in.readline
    loads = _loads
    while True:
        try:
            line = readline()
        except OSError:
            break
        if not line:
            break  # EOF: the agent closed the channel
        try:
            req = loads(line.decode("utf-8", "replace"))
        except Exception:  # StopIteration or ValueError: not JSON
            continue
        if isinstance(req, dict) and req.get("op") == "execute":
            env = req.get("env")
            if isinstance(env, dict):
                # Leap0's env_vars: set for this execution and the ones after it.
                os.environ.update({str(k): str(v) for k, v in env.items()})
            code = req.get("code")
            _execute(code if isinstance(code, str) else "")
    # os._exit: user threads or atexit handlers must not keep a discarded kernel alive.
    _flush_output()
    os._exit(0)


if __name__ == "__main__":
    _main()
