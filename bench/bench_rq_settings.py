"""rq's settings module (`rq worker -c bench_rq_settings`): the way rq users preload their app."""

import bench_app  # noqa: F401  (imported for its side effect: the app is loaded before rq forks)
