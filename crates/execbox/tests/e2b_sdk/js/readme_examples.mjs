// The README examples of the npm packages `e2b` and `@e2b/code-interpreter`, calls as written,
// against a real `execbox serve`. Run by `e2b_js_sdk_readme_examples` in
// crates/execbox/tests/e2b.rs with E2B_API_URL / E2B_SANDBOX_URL set to the server and
// E2B_API_KEY to its key; NODE_PATH names the directory the SDKs were installed into.
// Prints one labelled line per result; the Rust test checks them and the exit status.
import { createRequire } from 'node:module'
import path from 'node:path'

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    console.error(`${name} must be set (see crates/execbox/tests/e2b.rs)`)
    process.exit(2)
  }
}

// The SDKs live in the install directory, not next to this file.
const require = createRequire(path.join(process.env.E2B_JS_SDK_DIR, 'package.json'))
const e2b = await import(require.resolve('e2b'))
const ci = await import(require.resolve('@e2b/code-interpreter'))

// e2b README
{
  const { Sandbox } = e2b
  const sandbox = await Sandbox.create()
  const result = await sandbox.commands.run('echo "Hello from E2B!"')
  console.log('commands.run:', JSON.stringify(result.stdout)) // Hello from E2B!
  await sandbox.files.write('/tmp/readme.txt', 'written by the JS SDK')
  const content = await sandbox.files.read('/tmp/readme.txt')
  console.log('files.read:', JSON.stringify(content))
  const killed = await sandbox.kill()
  console.log('kill:', killed)
}

// e2b README (its code-interpreter example) and @e2b/code-interpreter README
{
  const { Sandbox } = ci
  const sbx = await Sandbox.create()
  const execution = await sbx.runCode('print("hello world")')
  console.log('runCode logs:', JSON.stringify(execution.logs))

  await sbx.runCode('x = 1')
  const execution2 = await sbx.runCode('x+=1; x')
  console.log('runCode text:', execution2.text) // outputs 2

  const execution3 = await sbx.runCode('x = 1; x += 1; x')
  console.log('runCode text (one cell):', execution3.text) // outputs 2
  await sbx.kill()
  console.log('code interpreter killed')
}
console.log('done')
