"""Loads the suite's pytest plugin (options, cluster, namespaces, recorders, report)."""

pytest_plugins = ["fixtures.plugin"]
