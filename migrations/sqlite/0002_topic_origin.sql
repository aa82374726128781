-- Topics created at run time (the admin API) are re-created at start from
-- these rows: where a topic came from, and its ring capacity (slots per
-- partition), which its rings on disk must match. Rows of 'config' topics
-- that leave the configuration file are disabled at start; 'runtime' ones
-- leave only by DELETE.
ALTER TABLE topics ADD COLUMN origin TEXT NOT NULL DEFAULT 'config' CHECK (origin IN ('config', 'runtime'));
ALTER TABLE topics ADD COLUMN capacity INTEGER;
