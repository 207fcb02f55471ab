"""shrinkserve HTTP server: OpenAI schemas, routing, metrics, settings, engines."""

if __name__ != "shrinkserve.server":
    # Reached as a top-level `server` (the repository root on sys.path): that name is not ours.
    from shrinkserve.kernels._toplevel import hand_over

    hand_over(__name__)
