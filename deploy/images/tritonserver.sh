#!/bin/sh
# `tritonserver` in the CPU image: the wheel's server with the backends baked in at build time
# (the root file system is read-only at run time, so they cannot be assembled per start).
exec /opt/tritonserver/server/bin/tritonserver --backend-directory=/opt/tritonserver/backends "$@"
