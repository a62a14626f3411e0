"""Container tests: deploy/Dockerfile built by podman and run hardened; the Kubernetes pod run by podman.

Marked `container`; scripts/test installs what they need (podman, runc,
catatonit, mmdebstrap) and always runs them. See conftest.py for how the
image is built here and podman.py for how podman is configured.
"""
