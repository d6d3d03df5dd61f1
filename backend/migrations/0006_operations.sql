-- 0006_operations: reserved (filled in by the issue that owns it). Until then it changes nothing.
SELECT 1;
