"""Ray Serve: the decomposer and solver as deployments, composed behind one HTTP ingress (see app.py)."""
