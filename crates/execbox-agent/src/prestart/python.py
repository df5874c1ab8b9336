# execbox pre-started Python: started as `python3 -c <this>` exactly as a fresh run starts (same
# interpreter, flags and site initialisation), it waits on fd 3 for one run, then becomes that
# run. It imports nothing: `sys` and `os` are loaded by every start-up, `_signal` by the
# interpreter itself. Message (NUL-separated): mode (c|f), stdin-null (0|1), cwd, code or
# path, argc, argv..., origc, orig_argv..., then KEY=VALUE environment entries.
def _execbox_run():
    import sys, os
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
    try:
        exec(compile(source, name, "exec", dont_inherit=True), g)
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
_execbox_run()
