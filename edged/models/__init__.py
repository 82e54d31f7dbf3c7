"""The model store on disk and the manager that serves its active versions."""
