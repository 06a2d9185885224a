"""Database adapters: one module per kind, all behind databases.base.Database."""
