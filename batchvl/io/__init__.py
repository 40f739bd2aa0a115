"""Reading input rows and writing output rows."""
