"""Data: bundled datasets, batch loaders with exact resume. Import submodules directly
(``ember.data.build``) — this package file stays empty to keep imports acyclic."""
