"""The OpenAI-compatible server: protocol.py (request fields, error shapes), app.py (the routes on the engine),
metrics.py (Prometheus), loadgen.py (`kataru bench serve`)."""
