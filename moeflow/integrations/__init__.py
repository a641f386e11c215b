"""Bridges to the engines and model libraries users arrive with (imported on demand: each needs
its own package, e.g. `pip install moeflow[integrations]`)."""
