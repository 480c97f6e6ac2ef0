"""The example app of `resque-starter demo` and of `docker run IMAGE`."""
