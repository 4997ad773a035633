"""Node-side programs: stdlib-only Python run on lab nodes. Never import the rest of labkit here."""
