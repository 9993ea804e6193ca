#!/bin/sh
# Do a little real work, print a report, and make the exit code the verdict.
set -eu
users=$(wc -l < /etc/passwd)
echo "job ${JOB_NAME}: ${users} accounts, kernel $(uname -r), running as $(id -un)"
if [ "${JOB_APPROVED:-no}" = yes ]; then
    echo "job ${JOB_NAME}: approved"
    exit 0
fi
echo "job ${JOB_NAME}: not approved (set JOB_APPROVED=yes)" >&2
exit 3
