"""Report text to searchable annotations, inside the gateway: the text of DICOM SR instances (sr), the queue
of those the archive stored (jobs), the annotator over the store's dictionary (annotating) and the process
that works the queue (worker). It sits above both halves: it reads the archive and writes the annotation
store."""
