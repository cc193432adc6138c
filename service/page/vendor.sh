#!/usr/bin/env bash
# Re-vendor the chat page's front-end libraries from the npm registry at pinned versions, with
# their licence files, into service/page/assets/vendor/. Needs npm; run from anywhere. The page
# itself needs no Node: these files are committed and shipped inside the wheel.
set -euo pipefail
MARKED=18.3.0
DOMPURIFY=3.5.0
HIGHLIGHT=11.12.0   # @highlightjs/cdn-assets: ES module builds of highlight.js

out="$(cd "$(dirname "$0")" && pwd)/assets/vendor"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HIGHLIGHT" >/dev/null
for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done

rm -rf "$out" && mkdir -p "$out"
# No source maps are shipped: drop the comments that would point at them.
strip_maps() { sed '/^\/\/# sourceMappingURL=/d' "$1" >"$2"; }
strip_maps "marked-$MARKED/package/lib/marked.esm.js" "$out/marked.esm.js"
cp "marked-$MARKED/package/LICENSE" "$out/marked.LICENSE.txt"
strip_maps "dompurify-$DOMPURIFY/package/dist/purify.es.mjs" "$out/purify.es.mjs"
cp "dompurify-$DOMPURIFY/package/LICENSE" "$out/dompurify.LICENSE.txt"
hl="highlightjs-cdn-assets-$HIGHLIGHT/package"
strip_maps "$hl/es/highlight.min.js" "$out/highlight.min.js"
cp "$hl/LICENSE" "$out/highlight.LICENSE.txt"
{
  echo "/* highlight.js $HIGHLIGHT themes: github (light), github-dark (dark), by prefers-color-scheme */"
  echo "@media (prefers-color-scheme: light) {"; cat "$hl/styles/github.min.css"; echo; echo "}"
  echo "@media (prefers-color-scheme: dark) {"; cat "$hl/styles/github-dark.min.css"; echo; echo "}"
} >"$out/highlight.css"
printf 'marked %s\ndompurify %s\n@highlightjs/cdn-assets %s\n' "$MARKED" "$DOMPURIFY" "$HIGHLIGHT" >"$out/VERSIONS.txt"
echo "vendored into $out:"; ls -l "$out"
