"""resque-starter: a container-native PID-1 supervisor that preloads an app once and forks rq workers."""

__version__ = "0.1.0"
