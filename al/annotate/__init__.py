"""Human answers to active-learning queries: a click-based page and Label Studio round trips."""
