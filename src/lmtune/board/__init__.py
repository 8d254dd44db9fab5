"""`lmtune board`: runs watched, compared and launched from a local web page (server.py; runs.py reads the folders)."""
