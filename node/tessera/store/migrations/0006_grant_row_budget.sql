-- A grant may bound the rows its peer reads within a rolling window (counted in Valkey,
-- across replicas): row_budget rows per row_budget_window_s seconds; 0 means no budget.
ALTER TABLE grants
    ADD COLUMN row_budget          bigint  NOT NULL DEFAULT 0 CHECK (row_budget >= 0),
    ADD COLUMN row_budget_window_s integer NOT NULL DEFAULT 0 CHECK (row_budget_window_s >= 0);
