"""pipelines: the Ray programs (ingest, train, sweep, predict, bench) and the `er` command line, built on er_core."""
