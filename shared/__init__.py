"""Code both sides of a fedrelapse consortium agree on.

Nothing in this package imports :mod:`server` or :mod:`client`.
"""
