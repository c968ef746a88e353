/*
 * A reference point for the SQL benchmark, not part of tob: a row trigger that does no work
 * but wait once, as long as its argument says (in microseconds, at least 1 ms), then lets the
 * row through.
 *
 * Any trigger that asks another machine before a row may be written - tob_unique, or a check
 * against a remote service - puts its backend to sleep once more per transaction than a local
 * unique index does, and on two cores shared by 64 busy backends that extra sleep and wake-up
 * costs CPU of its own. This trigger measures that cost with nothing else added: no network,
 * no cluster. bench-sql.sh runs it beside the local unique index and tob_unique, so the gap
 * between the local index and tob_unique splits into what any waiting trigger costs and what
 * the cluster costs.
 *
 * It waits on the backend's latch, as tob's client does, and so stays cancellable.
 */
#include "postgres.h"

#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(wait_trigger);

Datum
wait_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigger_data = (TriggerData *) fcinfo->context;
	long		wait_ms;
	TimestampTz deadline;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(trigger_data->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigger_data->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(trigger_data->tg_event) ||
		trigger_data->tg_trigger->tgnargs != 1)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("wait_trigger must be a BEFORE INSERT FOR EACH ROW trigger with one argument, the wait in microseconds")));

	wait_ms = Max(1, atol(trigger_data->tg_trigger->tgargs[0]) / 1000);
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), wait_ms);
	/* A latch set meanwhile (a signal) ends one WaitLatch early, not the wait. */
	for (;;)
	{
		long		left_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);

		if (left_ms <= 0)
			break;
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, left_ms,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	return PointerGetDatum(trigger_data->tg_trigtuple);
}
