"""Deterministic generators of task data whose labels follow a documented rule.

``credit``: loan applicants (age, occupation, income, debt, credit utilization, payment
behaviour) rendered as text in several styles, labelled Good / Standard / Bad.
"""
