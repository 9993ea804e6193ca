#!/bin/sh
# Count this start in /var/lib/app, then serve the count with busybox httpd.
set -eu
state=/var/lib/app
starts=$(cat "$state/starts" 2>/dev/null || echo 0)
starts=$((starts + 1))
echo "$starts" > "$state/starts"
mkdir -p "$state/www"
printf 'starts=%s\nwritten-by=%s\n' "$starts" "$(id -un)" > "$state/www/index.html"
echo "counter-service: start number $starts"
exec busybox httpd -f -p 8080 -h "$state/www"
