"""FastAPI control service (launches runs on Ray through the Jobs API). Built by a later issue."""
