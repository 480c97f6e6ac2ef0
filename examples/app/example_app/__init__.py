"""A tiny app for resque-starter's example image: jobs that use a dependency of the app's own."""
