"""Usage and limits: the usage writer, rate-limit windows counted in memory and shared through
the database, admission (concurrency caps, windows, budgets) and usage series for the pages."""
