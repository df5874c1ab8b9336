// execbox REPL kernel for Java: `java JavaKernel.java` (single-file source launch).
//
// Snippets run in this JVM through the jdk.jshell API with the "local" execution engine, so
// their System.out/System.err are this process's fds 1/2 (flushed before every control
// message). fd 3 is the control channel, a unix stream socket carrying newline-delimited JSON:
//   kernel -> agent: {"ev":"ready",...} once, then per execute: result?, error?, and always
//                    {"ev":"done","execution_count":N,"ok":bool}
//   agent -> kernel: {"op":"execute","code":"..."}
// SIGINT stops the running snippet (JShell.stop()); it is ignored while idle. EOF on fd 3 ends
// the kernel.

import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.lang.reflect.Field;
import java.lang.reflect.Proxy;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.stream.Collectors;

import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;
import jdk.jshell.VarSnippet;

public class JavaKernel {
    private static final int CTRL_FD = 3;

    private static OutputStream ctlOut;
    private static JShell shell;
    private static volatile boolean running;
    private static volatile boolean interrupted;

    public static void main(String[] args) throws Exception {
        FileDescriptor ctl;
        try {
            ctl = fileDescriptor(CTRL_FD);
        } catch (ReflectiveOperationException | RuntimeException e) {
            System.err.println("kernel: cannot open fd " + CTRL_FD + ": " + e);
            System.exit(2);
            return;
        }
        ctlOut = new FileOutputStream(ctl);
        BufferedReader in = new BufferedReader(new InputStreamReader(new FileInputStream(ctl), StandardCharsets.UTF_8));

        // "local": snippets run in this JVM (no remote agent JVM to start, output goes straight
        // to our fds 1/2). in = an empty stream: the sandbox gives no stdin anyway.
        shell = JShell.builder()
                .executionEngine("local")
                .in(new java.io.ByteArrayInputStream(new byte[0]))
                .out(System.out)
                .err(System.err)
                .build();
        onSigint(() -> {
            if (running) {
                interrupted = true;
                // JShell stops only code that runs: a stop that comes while the cell is still
                // being compiled (a loaded machine) would be lost, so ask until the cell ends.
                Thread stopper = new Thread(() -> {
                    while (running && interrupted) {
                        shell.stop();
                        try {
                            Thread.sleep(50);
                        } catch (InterruptedException e) {
                            return;
                        }
                    }
                });
                stopper.setDaemon(true);
                stopper.start();
            }
        });
        // The first evaluation loads and warms up javac (~1 s); pay for it before "ready" so
        // that the first cell is not the slow one.
        shell.eval("int $execbox_warmup = 0;");
        shell.drop(shell.snippets().filter(s -> s.source().contains("$execbox_warmup")).findFirst().get());

        Map<String, Object> ready = new LinkedHashMap<>();
        ready.put("ev", "ready");
        ready.put("language", "java");
        ready.put("version", System.getProperty("java.version"));
        send(ready);

        int count = 0;
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isBlank()) continue;
            Object msg;
            try {
                msg = new Json(line).parse();
            } catch (RuntimeException e) {
                System.err.println("kernel: bad control message: " + line);
                continue;
            }
            if (msg instanceof Map && "execute".equals(((Map<?, ?>) msg).get("op"))) {
                Object code = ((Map<?, ?>) msg).get("code");
                execute(code == null ? "" : code.toString(), ++count);
            } else {
                System.err.println("kernel: unknown op: " + line);
            }
        }
        // The agent closed the channel.
        System.out.flush();
        System.exit(0);
    }

    // A java.io.FileDescriptor for an inherited fd. A socket cannot be opened through
    // /proc/self/fd/N (ENXIO), and FileDescriptor(int) is private to java.base, so the fd
    // field is set with sun.misc.Unsafe (module jdk.unsupported, usable without flags).
    // Reflection keeps javac from warning about the proprietary API at every start.
    private static FileDescriptor fileDescriptor(int fd) throws ReflectiveOperationException {
        Class<?> unsafeClass = Class.forName("sun.misc.Unsafe");
        Field theUnsafe = unsafeClass.getDeclaredField("theUnsafe");
        theUnsafe.setAccessible(true);
        Object unsafe = theUnsafe.get(null);
        long offset = (long) unsafeClass.getMethod("objectFieldOffset", Field.class)
                .invoke(unsafe, FileDescriptor.class.getDeclaredField("fd"));
        FileDescriptor result = new FileDescriptor();
        unsafeClass.getMethod("putInt", Object.class, long.class, int.class).invoke(unsafe, result, offset, fd);
        if (!result.valid()) throw new IllegalStateException("fd not set");
        return result;
    }

    // SIGINT handler via sun.misc.Signal (reflection, for the same reason as above). It also
    // replaces the JVM's default, which would exit.
    private static void onSigint(Runnable action) {
        try {
            Class<?> signalClass = Class.forName("sun.misc.Signal");
            Class<?> handlerClass = Class.forName("sun.misc.SignalHandler");
            Object handler = Proxy.newProxyInstance(handlerClass.getClassLoader(), new Class<?>[] {handlerClass},
                    (proxy, method, margs) -> {
                        if (method.getName().equals("handle")) action.run();
                        return null;
                    });
            Object sigint = signalClass.getConstructor(String.class).newInstance("INT");
            signalClass.getMethod("handle", signalClass, handlerClass).invoke(null, sigint, handler);
        } catch (ReflectiveOperationException | RuntimeException e) {
            System.err.println("kernel: no SIGINT handler, interrupt will not work: " + e);
        }
    }

    // Errors are named as upstream's Java kernel (IJava, on jupyter-jvm-basekernel) names them:
    // ename is the simple class name of the exception IJava throws, evalue its message (""
    // when it has none), traceback IJava's lines without their ANSI colours:
    //   CompilationException            a snippet rejected or not defined (its diagnostics);
    //   EvalException                   the code threw: evalue is the exception's message, the
    //                                   traceback its stack trace under the real class name;
    //   UnresolvedReferenceException    a method called before what it uses is declared;
    //   IncompleteSourceException       the cell ends inside a snippet (evalue: that rest);
    //   EvaluationInterruptedException  SIGINT (an interrupt or a timeout of the agent).
    private static void execute(String code, int n) {
        boolean ok = true;
        String value = null;
        Map<String, Object> error = null;
        interrupted = false;
        running = true;
        try {
            SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
            // One cell may hold many snippets; jshell evaluates one at a time.
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(code);
            outer:
            while (info.completeness().isComplete()) {
                String source = info.source();
                value = null;
                List<SnippetEvent> events = shell.eval(source);
                for (SnippetEvent event : events) {
                    if (interrupted) break;
                    if (event.causeSnippet() != null) continue; // side effects on other snippets
                    if (event.exception() != null) {
                        error = runtimeError(event.exception());
                        break outer;
                    }
                    if (!event.status().isDefined()) {
                        error = compileError(event.snippet());
                        break outer;
                    }
                    if (event.value() != null && producesValue(event.snippet())) value = event.value();
                }
                if (interrupted) break;
                info = analysis.analyzeCompletion(info.remaining());
            }
            if (interrupted) {
                String src = code.trim();
                List<String> traceback = new ArrayList<>(src.lines().collect(Collectors.toList()));
                traceback.add("Evaluation interrupted.");
                error = errorEvent("EvaluationInterruptedException",
                        "Evaluator was interrupted while executing: '" + src + "'", traceback);
            } else if (error == null && info.completeness() != SourceCodeAnalysis.Completeness.EMPTY) {
                String rest = info.remaining().trim();
                List<String> traceback = new ArrayList<>();
                traceback.add("Incomplete input:");
                rest.lines().forEach(traceback::add);
                error = errorEvent("IncompleteSourceException", rest, traceback);
            }
        } catch (RuntimeException e) {
            // JShell itself failed (e.g. IllegalStateException after an internal error).
            error = errorEvent(e.getClass().getSimpleName(), e.getMessage() == null ? "" : e.getMessage(),
                    List.of(e.toString()));
        } finally {
            running = false;
        }
        if (error != null) {
            ok = false;
            send(error);
        } else if (value != null) {
            Map<String, Object> result = new LinkedHashMap<>();
            result.put("ev", "result");
            result.put("execution_count", n);
            Map<String, Object> data = new LinkedHashMap<>();
            data.put("text/plain", value);
            result.put("data", data);
            send(result);
        }
        Map<String, Object> done = new LinkedHashMap<>();
        done.put("ev", "done");
        done.put("execution_count", n);
        done.put("ok", ok);
        send(done);
    }

    // Expressions (`2+2`, `x`, which jshell stores in $N) show their value; declarations
    // (`int x = 4;`) and statements do not, as in the other kernels.
    private static boolean producesValue(Snippet s) {
        if (s.kind() == Snippet.Kind.EXPRESSION) return true;
        return s instanceof VarSnippet && s.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND;
    }

    // IJava's CompilationException: for each diagnostic, the snippet's lines up to the
    // offending one with a caret under it, the message (without javac's "location:" line), a
    // blank line; then the dependencies a declaration still lacks. The exception has no
    // message: evalue is "".
    private static Map<String, Object> compileError(Snippet snippet) {
        List<String> traceback = new ArrayList<>();
        String src = snippet.source();
        for (Diag d : (Iterable<Diag>) shell.diagnostics(snippet)::iterator) {
            if (d.getStartPosition() >= 0) {
                int start = (int) Math.min(src.length(), d.getStartPosition());
                int lineStart = src.lastIndexOf('\n', start - 1) + 1;
                int lineEnd = src.indexOf('\n', start);
                if (lineEnd < 0) lineEnd = src.length();
                traceback.add(src.substring(lineStart, lineEnd));
                traceback.add(" ".repeat(start - lineStart) + "^");
            } else {
                src.lines().forEach(traceback::add);
            }
            for (String line : d.getMessage(Locale.ROOT).split("\\R")) {
                if (!line.trim().startsWith("location:")) traceback.add(line);
            }
            traceback.add("");
        }
        if (snippet instanceof jdk.jshell.DeclarationSnippet) {
            List<String> deps = shell.unresolvedDependencies((jdk.jshell.DeclarationSnippet) snippet)
                    .collect(Collectors.toList());
            if (!deps.isEmpty()) {
                src.lines().forEach(traceback::add);
                traceback.add("Unresolved dependencies:");
                deps.forEach(dep -> traceback.add("   - " + dep));
            }
        }
        return errorEvent("CompilationException", "", traceback);
    }

    private static Map<String, Object> runtimeError(Exception e) {
        String ename = e.getClass().getSimpleName();
        String evalue = e.getMessage() == null ? "" : e.getMessage();
        if (e instanceof UnresolvedReferenceException) {
            // A method or class declared earlier still refers to something undeclared.
            jdk.jshell.DeclarationSnippet d = ((UnresolvedReferenceException) e).getSnippet();
            List<String> traceback = new ArrayList<>(d.source().lines().collect(Collectors.toList()));
            traceback.add("Unresolved dependencies:");
            shell.unresolvedDependencies(d).forEach(dep -> traceback.add("   - " + dep));
            return errorEvent(ename, evalue, traceback);
        }
        // EvalException: the stack trace under the class name of what the code threw, as IJava
        // prints it (below a rule, like the base kernel's).
        List<String> traceback = new ArrayList<>();
        traceback.add("---------------------------------------------------------------------------");
        Throwable t = e;
        String prefix = "";
        while (t != null) {
            String name = t instanceof EvalException ? ((EvalException) t).getExceptionClassName() : t.getClass().getName();
            traceback.add(prefix + name + (t.getMessage() == null ? "" : ": " + t.getMessage()));
            for (StackTraceElement el : t.getStackTrace()) {
                String cls = el.getClassName();
                // Below the snippet's frame is jshell's machinery.
                if (cls.startsWith("jdk.jshell.") || cls.startsWith("jdk.internal.reflect.")
                        || cls.startsWith("java.lang.reflect.")) break;
                // Snippet classes are synthetic (REPL.$JShell$N); jshell maps them to
                // "#id:line", the way its tool prints them.
                String where = el.getMethodName().isEmpty() || el.getMethodName().equals("do_it$")
                        ? "" : (cls.isEmpty() || cls.startsWith("REPL.") ? "" : cls + ".") + el.getMethodName() + " ";
                traceback.add("\tat " + where + "(" + el.getFileName() + ":" + el.getLineNumber() + ")");
            }
            t = t.getCause();
            prefix = "Caused by: ";
        }
        return errorEvent(ename, evalue, traceback);
    }

    private static Map<String, Object> errorEvent(String ename, String evalue, List<String> traceback) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("ev", "error");
        m.put("ename", ename);
        m.put("evalue", evalue);
        m.put("traceback", traceback);
        return m;
    }

    // Output of the snippets first, so the agent sees it before the message about them.
    private static synchronized void send(Map<String, Object> msg) {
        System.out.flush();
        System.err.flush();
        StringBuilder sb = new StringBuilder();
        writeJson(sb, msg);
        sb.append('\n');
        try {
            ctlOut.write(sb.toString().getBytes(StandardCharsets.UTF_8));
            ctlOut.flush();
        } catch (IOException e) {
            System.exit(0); // the agent is gone
        }
    }

    // ------------------------------------------------------------------ minimal JSON
    private static void writeJson(StringBuilder sb, Object v) {
        if (v == null) {
            sb.append("null");
        } else if (v instanceof String) {
            String s = (String) v;
            sb.append('"');
            for (int i = 0; i < s.length(); i++) {
                char c = s.charAt(i);
                switch (c) {
                    case '"': sb.append("\\\""); break;
                    case '\\': sb.append("\\\\"); break;
                    case '\n': sb.append("\\n"); break;
                    case '\r': sb.append("\\r"); break;
                    case '\t': sb.append("\\t"); break;
                    default:
                        if (c < 0x20 || Character.isSurrogate(c) && !validSurrogate(s, i)) {
                            sb.append(String.format("\\u%04x", (int) (c < 0x20 ? c : 0xfffd)));
                        } else {
                            sb.append(c);
                        }
                }
            }
            sb.append('"');
        } else if (v instanceof Map) {
            sb.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                if (!first) sb.append(',');
                first = false;
                writeJson(sb, e.getKey().toString());
                sb.append(':');
                writeJson(sb, e.getValue());
            }
            sb.append('}');
        } else if (v instanceof List) {
            sb.append('[');
            boolean first = true;
            for (Object o : (List<?>) v) {
                if (!first) sb.append(',');
                first = false;
                writeJson(sb, o);
            }
            sb.append(']');
        } else {
            sb.append(v); // numbers, booleans
        }
    }

    // Lone surrogates are not valid UTF-8; they are replaced.
    private static boolean validSurrogate(String s, int i) {
        char c = s.charAt(i);
        if (Character.isHighSurrogate(c)) return i + 1 < s.length() && Character.isLowSurrogate(s.charAt(i + 1));
        return i > 0 && Character.isHighSurrogate(s.charAt(i - 1));
    }

    private static final class Json {
        private final String s;
        private int i;

        Json(String s) { this.s = s; }

        Object parse() {
            Object v = value();
            ws();
            if (i != s.length()) throw new IllegalArgumentException("trailing data");
            return v;
        }

        private void ws() {
            while (i < s.length() && Character.isWhitespace(s.charAt(i))) i++;
        }

        private Object value() {
            ws();
            char c = s.charAt(i);
            if (c == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++;
                ws();
                if (s.charAt(i) == '}') { i++; return m; }
                while (true) {
                    ws();
                    String k = string();
                    ws();
                    expect(':');
                    m.put(k, value());
                    ws();
                    if (s.charAt(i) == ',') { i++; continue; }
                    expect('}');
                    return m;
                }
            }
            if (c == '[') {
                List<Object> l = new ArrayList<>();
                i++;
                ws();
                if (s.charAt(i) == ']') { i++; return l; }
                while (true) {
                    l.add(value());
                    ws();
                    if (s.charAt(i) == ',') { i++; continue; }
                    expect(']');
                    return l;
                }
            }
            if (c == '"') return string();
            if (s.startsWith("true", i)) { i += 4; return Boolean.TRUE; }
            if (s.startsWith("false", i)) { i += 5; return Boolean.FALSE; }
            if (s.startsWith("null", i)) { i += 4; return null; }
            int st = i;
            while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
            return Double.parseDouble(s.substring(st, i));
        }

        private void expect(char c) {
            if (s.charAt(i) != c) throw new IllegalArgumentException("expected " + c + " at " + i);
            i++;
        }

        private String string() {
            expect('"');
            StringBuilder sb = new StringBuilder();
            while (true) {
                char c = s.charAt(i++);
                if (c == '"') return sb.toString();
                if (c != '\\') { sb.append(c); continue; }
                char e = s.charAt(i++);
                switch (e) {
                    case 'n': sb.append('\n'); break;
                    case 't': sb.append('\t'); break;
                    case 'r': sb.append('\r'); break;
                    case 'b': sb.append('\b'); break;
                    case 'f': sb.append('\f'); break;
                    case 'u': sb.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                    default: sb.append(e); // " \ /
                }
            }
        }
    }
}
