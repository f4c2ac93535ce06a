"""Storage: the only package that imports SQLAlchemy. Verbs in ``store``, tables in ``models``."""
