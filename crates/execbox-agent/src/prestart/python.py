# execbox pre-started Python: started as `python3 -c <this>` exactly as a fresh run starts (same
# interpreter, flags and site initialisation), it waits on fd 3 for one run, then becomes that
# run. It imports nothing: `sys` and `os` are loaded by every start-up, `_signal` by the
# interpreter itself. Message (NUL-separated): mode (c|f), stdin-null (0|1), cwd, code or
# path, argc, argv..., origc, orig_argv..., then KEY=VALUE environment entries.
#
# Quiet exit: the interpreter's finalization (module teardown, collection of every object) is
# 2-3 ms of a 9 ms `python3 -c 'print(1)'`. A program that ends normally and provably left
# nothing for it to do (no imports but the modules below, no finalizers, files, threads,
# generators, exit handlers or reflection: `_quiet_at_exit`, `_nothing_left`) has its standard
# streams flushed, as finalization would, then `os._exit(0)`; anything else ends as usual.

# Modules whose import and teardown run no user-visible code at exit (with what they import).
_QUIET_MODULES = frozenset("""
    math cmath json re random string collections itertools functools operator heapq bisect
    statistics fractions decimal datetime time typing enum dataclasses copy pprint textwrap
    array numbers abc unicodedata keyword reprlib types copyreg contextlib ast dis opcode
    token tokenize linecache inspect importlib warnings weakref _weakrefset _ast _bisect
    _collections _datetime _decimal _pydecimal _functools _heapq _json _opcode _operator
    _random _sha512 _sha2 _sre _statistics _string _typing _struct struct _contextvars
    contextvars _strptime calendar locale _locale hashlib _hashlib _blake2 _md5 _sha1 _sha3
    base64 binascii _pydatetime
""".split())
# Dunder names a plain program uses (`__name__`, class bodies, the usual special methods);
# any other (`__del__`, `__class__`, `__subclasses__`, `__import__`, ...) ends as usual.
_QUIET_DUNDERS = frozenset("""
    __name__ __main__ __module__ __qualname__ __doc__ __annotations__ __init__ __repr__ __str__
    __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ __len__ __bool__ __getitem__
    __setitem__ __delitem__ __contains__ __iter__ __next__ __add__ __radd__ __sub__ __mul__
    __rmul__ __truediv__ __floordiv__ __mod__ __pow__ __neg__ __abs__ __call__ __post_init__
    __slots__ __format__ __match_args__ __classcell__
""".split())
# Names (globals or attributes) that reach files, threads, exit handlers, finalizers or the
# interpreter's own machinery.
_LOUD_NAMES = frozenset("""
    open exec eval compile globals locals vars getattr setattr delattr breakpoint help
    os sys io _io fdopen popen system settrace setprofile addaudithook register atexit
    Thread start_new_thread _thread threading finalize signal subprocess socket tempfile
    stdout stderr stdin builtins inspect importlib import_module ctypes gc mmap weakref
    multiprocessing concurrent asyncio logging __builtins__ __import__ modules
""".split())
# Generators, coroutines and async generators can run `finally` blocks when finalized.
_CO_SUSPENDS = 0x20 | 0x80 | 0x100 | 0x200


def _quiet_at_exit(code):
    """Whether the compiled program provably leaves finalization nothing to do but flush."""
    todo = [code]
    while todo:
        co = todo.pop()
        if co.co_flags & _CO_SUSPENDS and co.co_name != "<genexpr>":
            return False
        for n in co.co_names:
            for part in n.split("."):
                if part in _LOUD_NAMES:
                    return False
                if part.startswith("__") and part not in _QUIET_DUNDERS:
                    return False
        consts = list(co.co_consts)
        while consts:
            c = consts.pop()
            if type(c) is str:
                if c.startswith("__") and c.endswith("__") and c not in _QUIET_DUNDERS:
                    return False
            elif type(c) in (tuple, frozenset):
                consts.extend(c)
            elif hasattr(c, "co_code"):
                todo.append(c)
    return True


def _nothing_left(sys, before):
    """After a quiet program: no module imported beyond the quiet ones, no exit handler, no
    thread but this one."""
    for name in sys.modules:
        if name not in before and name.partition(".")[0] not in _QUIET_MODULES:
            return False
    if "threading" in sys.modules:
        return False
    import atexit
    return atexit._ncallbacks() == 0


def _execbox_run():
    import sys, os
    # Start-up options that act at exit (dev mode, -X, PYTHON* such as PYTHONMALLOCSTATS).
    plain = not (sys._xoptions or sys.flags.dev_mode or sys.flags.inspect
                 or any(k.startswith("PYTHON") for k in os.environ))
    os.write(3, b"R")
    data = b""
    while True:
        chunk = os.read(3, 1 << 20)
        if not chunk:
            break
        data += chunk
    f = data.split(b"\0")
    mode, null_in, cwd, target = f[0], f[1], os.fsdecode(f[2]), os.fsdecode(f[3])
    n = int(f[4])
    argv = [os.fsdecode(a) for a in f[5:5 + n]]
    i = 5 + n
    m = int(f[i])
    orig = [os.fsdecode(a) for a in f[i + 1:i + 1 + m]]
    env = f[i + 1 + m:]
    try:
        os.chdir(cwd)
    except OSError:
        # The agent starts the run fresh instead, which reports the error as a fresh run does.
        os.write(3, b"E")
        os._exit(0)
    os.environ.clear()
    for kv in env:
        k, _, v = kv.partition(b"=")
        os.environ[os.fsdecode(k)] = os.fsdecode(v)
    if null_in == b"1":
        fd = os.open("/dev/null", os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
    os.write(3, b"K")
    os.close(3)
    old = sys.modules["__main__"]
    main = type(sys)("__main__")
    g = main.__dict__
    if mode == b"c":
        g["__loader__"] = old.__dict__["__loader__"]
        g["__annotations__"] = {}
        g["__builtins__"] = sys.modules["builtins"]
        name, source = "<string>", target
    else:
        path = os.path.abspath(target)
        try:
            with open(path, "rb") as fh:
                source = fh.read()
        except OSError as e:
            sys.stderr.write("%s: can't open file %r: [Errno %d] %s\n"
                             % (orig[0] if orig else "python3", target, e.errno, e.strerror))
            sys.stderr.flush()
            os._exit(2)
        g["__loader__"] = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", path)
        g["__annotations__"] = {}
        g["__builtins__"] = sys.modules["builtins"]
        g["__file__"] = path
        g["__cached__"] = None
        sys.path[0] = os.path.dirname(os.path.realpath(target))
        name = path
    sys.argv = argv
    sys.orig_argv = orig
    sys.modules["__main__"] = main
    del old, f, data, env, orig, argv
    quiet = False
    before = set(sys.modules)
    try:
        code = compile(source, name, "exec", dont_inherit=True)
        try:
            quiet = plain and _quiet_at_exit(code)
        except Exception:
            quiet = False
        exec(code, g)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__.tb_next
        e.__traceback__ = tb
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, tb
        sys.excepthook(type(e), e, tb)
        if isinstance(e, KeyboardInterrupt):
            import _signal
            for s in (sys.stdout, sys.stderr):
                try:
                    s.flush()
                except Exception:
                    pass
            _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            os.kill(os.getpid(), _signal.SIGINT)
        raise SystemExit(1) from None
    if quiet and _nothing_left(sys, before):
        try:
            # What finalization does first: flush stdout, then stderr.
            for s in (sys.stdout, sys.stderr):
                if s is not None:
                    s.flush()
        except BaseException:
            return
        os._exit(0)


_execbox_run()
