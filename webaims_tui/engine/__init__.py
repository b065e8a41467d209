"""The archive itself: DICOM server, autoloader, anonymization, database, query/retrieve.

Nothing below this package imports Textual or Rich; the UI and the CLI talk to it through
:class:`webaims_tui.engine.service.Engine` and the events in :mod:`webaims_tui.engine.events`.
"""
