#!/bin/sh
# Coverage merging is not available offline; `bazel coverage` then produces no merged report.
exit 0
