"""Models, chosen by name from one explicit table (see ``ember.models.registry``)."""
