"""Models, each registered where it is defined (``ember.models.zoo``); ``ember.models.registry`` derives the tables."""
