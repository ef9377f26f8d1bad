// Bundles src/main.js (cornerstone3D core + tools) into dist/ and copies the static page.
import { build } from 'esbuild';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';

const watch = process.argv.includes('--watch');
rmSync('dist', { recursive: true, force: true });
mkdirSync('dist', { recursive: true });
copyFileSync('src/index.html', 'dist/index.html');
copyFileSync('src/style.css', 'dist/style.css');
await build({
  entryPoints: ['src/main.js'],
  bundle: true,
  format: 'esm',
  target: ['chrome110', 'firefox115', 'safari16'],
  outfile: 'dist/app.js',
  minify: !watch,
  sourcemap: true,
  legalComments: 'linked',
  logLevel: 'warning',
  // cornerstone's optional codecs and workers are not used by this page (it loads raw voxels).
  loader: { '.wasm': 'file' },
  define: { 'process.env.NODE_ENV': '"production"' },
});
console.log('built dist/ (index.html, style.css, app.js)');
